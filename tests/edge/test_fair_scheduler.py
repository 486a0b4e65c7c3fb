"""The scheduler's fairness and bounds, as pure bookkeeping with an injected clock (`now`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cicada.common.errors import ConfigError
from cicada.common.protocol import Request, Status
from cicada.edge.coordinator.config import load_config
from cicada.edge.coordinator.scheduler import Admission, FairQueue, Pending, Refusal, Scheduler

A, B, C = b"client-a", b"client-b", b"client-c"


def scheduler(**limits: object) -> Scheduler:
    admission = dict(queue_limit=100, client_queue_limit=100, max_queued_bytes=10_000,
                     max_client_queued_bytes=1_000, default_deadline_s=60.0)  # fmt: skip
    admission.update(limits)
    return Scheduler(Admission(**admission), 1000, lambda model: True)  # type: ignore[arg-type]


def request(rid: str, nbytes: int = 8, priority: int = 1, timeout_ms: int | None = None) -> Request:
    return Request(id=rid, model="m", inputs=[np.zeros(nbytes, np.uint8)], priority=priority,
                   timeout_ms=timeout_ms)  # fmt: skip


def admitted(s: Scheduler, client: bytes, rid: str, now: float = 0.0, **kw: object) -> Pending:
    p = s.admit(client, request(rid, **kw), now)  # type: ignore[arg-type]
    assert isinstance(p, Pending), p
    return p


def drain(q: FairQueue, pending: dict[str, Pending], slots: int) -> list[str]:
    """What a dispatch pass with `slots` free takes: its request ids, in order."""
    out = []
    for client, key in q.order():
        if len(out) == slots:
            break
        q.took(client, key)
        out.append(pending[key].request.id)
    return out


def test_clients_take_turns_within_a_priority() -> None:
    s = scheduler()
    for i in range(6):
        admitted(s, A, f"a{i}")  # the flood first
    admitted(s, B, "b0")
    admitted(s, B, "b1")
    admitted(s, C, "c0")
    q = s.queues["m"][1]
    assert drain(q, s.pending, 5) == ["a0", "b0", "c0", "a1", "b1"]
    assert drain(q, s.pending, 10) == ["a2", "a3", "a4", "a5"]
    assert len(q) == 0 and not q


def test_one_free_slot_at_a_time_still_rotates() -> None:
    s = scheduler()
    for i in range(3):
        admitted(s, A, f"a{i}")
        admitted(s, B, f"b{i}")
    q = s.queues["m"][1]
    taken = [drain(q, s.pending, 1)[0] for _ in range(6)]
    assert taken == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_skipped_key_stays_and_the_walk_goes_on() -> None:
    s = scheduler()
    for rid in ("a0", "a1"):
        admitted(s, A, rid)
    admitted(s, B, "b0")
    q = s.queues["m"][1]
    seen = [s.pending[key].request.id for _, key in q.order()]  # nothing taken
    assert seen == ["a0", "b0", "a1"] and len(q) == 3


def test_requeued_goes_first() -> None:
    s = scheduler()
    a0 = admitted(s, A, "a0")
    admitted(s, B, "b0")
    q = s.queues["m"][1]
    assert drain(q, s.pending, 1) == ["a0"]
    s.requeue(a0)
    assert drain(q, s.pending, 2) == ["a0", "b0"]


def test_client_queue_limit() -> None:
    s = scheduler(client_queue_limit=2)
    admitted(s, A, "a0")
    admitted(s, A, "a1")
    refusal = s.admit(A, request("a2"), 0.0)
    assert isinstance(refusal, Refusal) and refusal.status is Status.REJECTED
    assert "client_queue_limit (2)" in refusal.error and refusal.retry_after_ms
    admitted(s, B, "b0")  # another client still has room


def test_bytes_caps_and_their_release() -> None:
    s = scheduler(max_client_queued_bytes=100, max_queued_bytes=150)
    a0 = admitted(s, A, "a0", nbytes=60)
    refusal = s.admit(A, request("a1", nbytes=60), 0.0)
    assert isinstance(refusal, Refusal) and "max_client_queued_bytes" in refusal.error
    admitted(s, B, "b0", nbytes=80)
    refusal = s.admit(C, request("c0", nbytes=20), 0.0)
    assert isinstance(refusal, Refusal) and "max_queued_bytes" in refusal.error
    assert s.held_bytes == 140
    s.forget(a0.key)  # answered: its bytes are free again
    assert s.held_bytes == 80 and A not in s.clients
    admitted(s, C, "c0", nbytes=20)


def test_default_deadline_and_expiry() -> None:
    s = scheduler(default_deadline_s=5.0)
    p = admitted(s, A, "no-deadline", now=100.0)
    assert p.deadline == 105.0
    q = admitted(s, A, "own", now=100.0, timeout_ms=1000)
    assert q.deadline == 101.0
    assert [x.request.id for x in s.expired(104.0)] == ["own"]
    assert [x.request.id for x in s.expired(105.0)] == ["no-deadline"]
    assert len(s.queues["m"][1]) == 0


def test_priority_zero_only_when_allowed() -> None:
    s = scheduler()
    refusal = s.admit(A, request("c", priority=0), 0.0, critical=False)
    assert isinstance(refusal, Refusal) and refusal.status is Status.BAD_REQUEST
    assert "critical_clients" in refusal.error
    assert isinstance(s.admit(A, request("c", priority=0), 0.0, critical=True), Pending)


def test_drop_client_forgets_everything_it_holds() -> None:
    s = scheduler()
    running = admitted(s, A, "a0")
    s.queues["m"][1].took(A, running.key)
    running.worker = b"worker"
    admitted(s, A, "a1")
    admitted(s, A, "a2", priority=2)
    admitted(s, B, "b0")
    dropped = s.drop_client(A)
    assert sorted(p.request.id for p in dropped) == ["a0", "a1", "a2"]
    assert [p.request.id for p in s.pending.values()] == ["b0"]
    assert len(s.queues["m"][1]) == 1 and len(s.queues["m"][2]) == 0
    assert A not in s.clients and s.held_bytes == 8
    assert s.withdraw(B, "b0") is not None and s.held_bytes == 0 and not s.clients


def test_config_sizes_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "cicada.toml"
    path.write_text('[coordinator]\nmax_queued_bytes = "1GiB"\nmax_client_queued_bytes = 1024\n'
                    'default_deadline_s = 5\nallow_critical = false\n'
                    f'critical_clients = ["{"k" * 40}"]\n')  # fmt: skip
    c = load_config(path).coordinator
    assert (c.max_queued_bytes, c.max_client_queued_bytes) == (2**30, 1024)
    assert c.default_deadline_s == 5.0 and not c.allow_critical
    assert c.critical_clients == ["k" * 40]
    defaults = path.with_name("defaults.toml")
    defaults.write_text("[coordinator]\n")
    d = load_config(defaults).coordinator
    assert (d.max_queued_bytes, d.max_client_queued_bytes) == (2**30, 256 * 2**20)
    assert d.default_deadline_s == 60.0 and d.allow_critical and d.client_queue_limit is None
    for bad in ('max_queued_bytes = "lots"', 'critical_clients = ["short"]',
                "max_client_queued_bytes = 0"):  # fmt: skip
        path.write_text(f"[coordinator]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_config(path)
