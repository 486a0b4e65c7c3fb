"""Defaults and limits that more than one role (or the SDK) must agree on, defined once.

Plain constants only: every role, the SDK and the CLI import this module (no numpy, no zmq).
"""

from __future__ import annotations

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"  # where the coordinator binds and everyone connects
DEFAULT_METRICS = "127.0.0.1:9464"  # the coordinator's Prometheus /metrics (HOST:PORT)

# Request priorities (docs/PROTOCOL.md section 6): lower numbers are dispatched first.
CRITICAL, NORMAL, QUALITY = 0, 1, 2  # latency-critical, normal, quality-seeking
PRIORITIES = (CRITICAL, NORMAL, QUALITY)

MAX_NEW_TOKENS = 4096  # one generation request may not ask for more (section 12)

HEARTBEAT_INTERVAL_S = 0.5  # both sides heartbeat this often when otherwise silent (section 7)
LIVENESS = 4  # heartbeat intervals without a word before a peer counts as dead
QUEUE_LIMIT = 1024  # the coordinator's queue bound, per model and priority
# What one coordinator holds (docs/PROTOCOL.md section 13): request tensor bytes in all, and
# for one client; the deadline of a request that brings none.
MAX_QUEUED_BYTES = 1 << 30  # 1 GiB
MAX_CLIENT_QUEUED_BYTES = 256 << 20  # 256 MiB
DEFAULT_DEADLINE_S = 60.0

DEFAULT_TIMEOUT_S = 30.0  # how long a client call waits at most, unless told otherwise
