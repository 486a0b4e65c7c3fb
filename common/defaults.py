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

# Dynamic batching bounds (Triton's settings; cloud/batching.py): a batch is at most READY's
# `capacity` bound, and its first request waits at most a minute for company.
MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_MS = 60_000.0
BATCHING_SETTINGS = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes")
# What the model allows, so only its package says it (never a deployment's override): token
# requests of different lengths padded to share a forward (cloud/batching.py), and which of its
# outputs have the sequence as their second dimension (cut back to each request's length).
PADDING_SETTINGS = ("pad_sequences", "sequence_outputs")
MAX_OUTPUTS = 64  # a sequence output's index is below this

DEFAULT_TIMEOUT_S = 30.0  # how long a client call waits at most, unless told otherwise

# When a CPU cloud worker's one-token decode and verify forwards run on row-invariant linears
# (cloud/few_rows.py): auto from 2 torch threads on; always also on one (a worker serving exact
# generations with edge drafts gains more there than its decode alone loses); never.
ROW_INVARIANCE = ("auto", "always", "never")
