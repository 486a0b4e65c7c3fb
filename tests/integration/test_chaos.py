"""Chaos on loopback: real `python -m cicada coordinator|edge|cloud` processes, killed mid-work.

Every scenario keeps requests in flight (client threads, or an AsyncClient) while a process is
SIGKILLed, SIGTERMed or restarted, then checks the one promise that matters to a caller:

* every request sent ends in exactly one outcome: a result, or an explicit error from the SDK's
  tree (Timeout, Rejected, Unavailable, BadRequest, Failed) — counted call by call;
* no request id is answered twice: every REPLY that reaches a client's socket is recorded by a
  wrapping transport, late ones included, and no id may appear twice;
* nothing hangs: every call has an explicit timeout, every wait here is bounded, and where the
  coordinator survives, its own count of answered requests equals the number sent.

Times below are generous bounds on waiting for a condition, never latency claims.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cicada.client import AsyncClient, Client, InvokeResult
from cicada.common.protocol import (
    Dispatch,
    Heartbeat,
    Ready,
    Result,
    Status,
)
from cicada.errors import (
    BadRequest,
    ClientError,
    Failed,
    NoCoordinator,
    Rejected,
    Timeout,
    Unavailable,
)
from cicada.testing import (
    ROOT,
    RecordingAsyncTransport,
    RecordingTransport,
    Stack,
    StandInCoordinator,
    tiny_gpt2_config,
)
from tests.security import faulty_model

MODEL = "gpt2"
HEARTBEAT = 0.5  # cicada.testing.Stack's default: a silent peer is dead after 4 × 0.5 s
# The SDK's explicit outcomes. TransportError is deliberately not here: nothing in these
# scenarios is malformed, so a TransportError would be a bug worth seeing; its NoCoordinator
# is the SDK saying that the coordinator (killed on purpose) does not answer.
EXPLICIT = (Timeout, Rejected, Unavailable, BadRequest, Failed, NoCoordinator)
# A prompt of token ids (< 97, the tiny GPT-2's vocabulary) for streamed generations.
PROMPT = np.asarray([[3, 14, 15, 92, 6, 53]], dtype=np.int64)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> dict[str, Path]:
    """The tiny GPT-2 package, its ONNX edge model and an input; plus the same GPT-2 packed
    with the faulty model's factory, whose build waits behind a gate (`gated_cloud`)."""
    from cicada.cloud.packing import pack

    work = tmp_path_factory.mktemp("chaos-assets")
    paths = dict(tiny_package)
    paths["gated"] = work / "pkg-gated"
    pack("tests.security.faulty_model:build", paths["gated"], config=tiny_gpt2_config())
    return paths


def gated_cloud(
    s: Stack, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, gate: Path
) -> None:
    """A cloud worker that stays cold (its build waits) until `gate` exists: a load caught in
    progress however fast or busy the machine (racing a real load made these tests flaky)."""
    monkeypatch.setenv(faulty_model.GATE_ENV, str(gate))
    s.cloud(MODEL, assets["gated"], "cloud", "--trust-package-code")
    monkeypatch.delenv(faulty_model.GATE_ENV)


@pytest.fixture
def x(assets: dict[str, Path]) -> np.ndarray:
    return np.load(assets["input"])


# -- traffic that records every outcome ------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    priority: int
    deadline: float | None
    sent: float  # time.monotonic() before the call
    done: float  # time.monotonic() after it returned or raised
    result: InvokeResult | None = None
    error: BaseException | None = None

    @property
    def request_id(self) -> str | None:
        if self.result is not None:
            return self.result.request_id
        return getattr(self.error, "request_id", None)

    @property
    def role(self) -> str | None:
        return None if self.result is None else self.result.served_by.get("role")


Plan = Callable[[int], tuple[int, float | None]]  # request index -> (priority, deadline)


def cycle(priorities: Sequence[int], deadline: float | None) -> Plan:
    return lambda i: (priorities[i % len(priorities)], deadline)


class Traffic:
    """Calls in flight until stopped: `threads` sync Clients (one per thread, as the SDK asks)
    and/or one AsyncClient with `concurrent` calls at once. Each call has an explicit timeout.
    """

    def __init__(
        self,
        address: str,
        x: np.ndarray,
        plan: Plan,
        *,
        threads: int = 4,
        concurrent: int = 0,
        pause: float = 0.02,
        timeout: float = 8.0,
    ) -> None:
        self.address, self.x, self.plan = address, x, plan
        self.pause, self.timeout = pause, timeout
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self.wire_ids: list[str] = []
        self._lock = threading.Lock()
        self._indices = itertools.count()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._sync_loop, name=f"chaos-client-{n}", daemon=True)
            for n in range(threads)
        ]
        if concurrent:
            self._threads.append(
                threading.Thread(
                    target=lambda: asyncio.run(self._async_main(concurrent)),
                    name="chaos-async-client",
                    daemon=True,
                )
            )

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(check=exc_type is None)  # don't hide the error that ended the block

    def stop(self, check: bool = True) -> None:
        """Stop sending; every call in flight must end within its own timeout (bounded)."""
        self._stop.set()
        bound = time.monotonic() + self.timeout + 10.0
        for t in self._threads:
            t.join(max(0.0, bound - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not (check and hung), f"client threads still waiting on a call: {hung}"

    def _next(self) -> tuple[int, int, float | None]:
        with self._lock:
            i = next(self._indices)
            self.sent += 1
        priority, deadline = self.plan(i)
        return i, priority, deadline

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _sync_loop(self) -> None:
        transport = RecordingTransport(self.address)
        with Client(self.address, timeout=self.timeout, transport=transport) as client:
            while not self._stop.is_set():
                i, priority, deadline = self._next()
                o = Outcome(i, priority, deadline, time.monotonic(), 0.0)
                try:
                    o.result = client.invoke(MODEL, self.x, priority=priority, deadline=deadline)
                except Exception as exc:  # judged by check_outcomes: explicit, or a bug
                    o.error = exc
                o.done = time.monotonic()
                self._record(o)
                time.sleep(self.pause)
            while transport.recv(0.3) is not None:  # late (duplicate?) replies still coming
                pass
        with self._lock:
            self.wire_ids += transport.reply_ids

    async def _async_main(self, concurrent: int) -> None:
        transport = RecordingAsyncTransport(self.address)
        async with AsyncClient(self.address, timeout=self.timeout, transport=transport) as client:

            async def loop() -> None:
                while not self._stop.is_set():
                    i, priority, deadline = self._next()
                    o = Outcome(i, priority, deadline, time.monotonic(), 0.0)
                    try:
                        o.result = await client.invoke(
                            MODEL, self.x, priority=priority, deadline=deadline
                        )
                    except Exception as exc:
                        o.error = exc
                    o.done = time.monotonic()
                    self._record(o)
                    await asyncio.sleep(self.pause)

            await asyncio.gather(*(loop() for _ in range(concurrent)))
            await asyncio.sleep(0.3)  # late (duplicate?) replies still coming
        with self._lock:
            self.wire_ids += transport.reply_ids

    # -- views -------------------------------------------------------------------------------

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result is not None]

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def summary(self) -> str:
        kinds = Counter(
            f"OK/{o.role}" if o.result is not None else _kind(o.error) for o in self.outcomes
        )
        return f"sent {self.sent}, outcomes {len(self.outcomes)}: {dict(kinds)}"


def _kind(error: BaseException | None) -> str:
    if isinstance(error, Timeout):
        return f"Timeout/{error.side}"
    return type(error).__name__


def check_outcomes(traffic: Traffic, slack: float = 2.0) -> None:
    """Exactly one explicit outcome per request, no id twice, none later than its bound."""
    outcomes = traffic.outcomes
    assert traffic.sent > 0
    assert len(outcomes) == traffic.sent, traffic.summary()
    assert sorted(o.index for o in outcomes) == list(range(traffic.sent))
    ids = [o.request_id for o in outcomes]
    assert None not in ids, "an outcome that names no request"
    twice = [rid for rid, n in Counter(ids).items() if n > 1]
    assert not twice, f"request ids with two outcomes: {twice}"
    wire_twice = [rid for rid, n in Counter(traffic.wire_ids).items() if n > 1]
    assert not wire_twice, f"request ids the coordinator answered twice: {wire_twice}"
    answers = {
        o.request_id
        for o in outcomes
        if o.result is not None or getattr(o.error, "side", "coordinator") == "coordinator"
    }
    assert answers <= set(traffic.wire_ids), "replies the recording transport did not see"
    unknown = set(traffic.wire_ids) - set(ids)
    assert not unknown, f"replies to requests nobody sent: {unknown}"
    unexplained = [
        (o.index, repr(o.error))
        for o in outcomes
        if o.result is None and not isinstance(o.error, EXPLICIT)
    ]
    assert not unexplained, f"outcomes outside the SDK's explicit errors: {unexplained}"
    bound = {
        o.index: o.done - o.sent
        for o in outcomes
        if o.done - o.sent > (traffic.timeout if o.deadline is None else o.deadline) + slack
    }
    assert not bound, f"outcomes later than deadline + {slack} s: {bound}"


# -- the stack, seen through the coordinator's /metrics --------------------------------------------


def cloud_states(s: Stack) -> set[str]:
    return {w["state"] for w in s.status()["workers"] if w["role"] == "cloud"}


def answered(s: Stack, route: str | None = None, status: str | None = None) -> int:
    """Requests the coordinator has answered (cicada_requests_total), optionally by label."""
    return sum(
        r["count"]
        for r in s.status()["requests"]
        if (route is None or r["route"] == route) and (status is None or r["status"] == status)
    )


def wait_answered(s: Stack, expected: int) -> None:
    """The coordinator owes nothing: it answered every request it got, and only once each."""
    s.wait_for(
        lambda st: sum(r["count"] for r in st["requests"]) >= expected,
        what=f"{expected} requests answered by the coordinator",
        timeout=20,
    )
    time.sleep(3 * HEARTBEAT)  # a second answer to anything would show by now
    assert answered(s) == expected, s.log("coordinator")


def wait_no_workers(s: Stack, role: str | None = None, timeout: float = 15.0) -> None:
    s.wait_for(
        lambda st: not [w for w in st["workers"] if role is None or w["role"] == role],
        what=f"no {role or ''} workers registered",
        timeout=timeout,
    )


def coordinator_log(s: Stack) -> str:
    path = s.work / "coordinator.log"
    return path.read_text(errors="replace") if path.exists() else ""


def logs(s: Stack) -> str:
    return "\n".join(f"--- {name}.log ---\n{s.log(name)}" for name in s.procs)


def invoke(
    address: str, x: np.ndarray, *, priority: int = 1, deadline: float | None = 5.0
) -> InvokeResult:
    with Client(address, timeout=10.0) as client:
        return client.invoke(MODEL, x, priority=priority, deadline=deadline)


def outcome_of(address: str, x: np.ndarray, **kwargs: Any) -> InvokeResult | ClientError:
    try:
        return invoke(address, x, **kwargs)
    except ClientError as exc:
        return exc


# -- 1. the cloud worker dies while it loads -------------------------------------------------------


def test_sigkill_cloud_worker_mid_load(
    stack: Stack,
    assets: dict[str, Path],
    x: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.wait_workers("edge", 1)

    # Quality-seeking work fits the loading worker's ETA, so it is dispatched to it (one slot)
    # and held for it in the coordinator; normal work goes to the edge meanwhile. The worker's
    # build never passes its gate: it is killed in its cold start, with work held for it.
    plan = cycle([2, 2, 1, 2, 1, 0], deadline=3.0)
    with Traffic(s.address, x, plan, threads=6) as traffic:
        gated_cloud(s, assets, monkeypatch, tmp_path / "never-opened")
        s.wait_workers("cloud", 1, timeout=30)
        s.wait_for(
            lambda st: any(q["priority"] == "2" and q["depth"] > 0 for q in st["queues"]),
            what="quality-seeking requests held for the loading cloud worker",
            timeout=30,
        )
        assert cloud_states(s) == {"cold"}, logs(s)
        s.kill("cloud")  # SIGKILL, mid-load
        wait_no_workers(s, "cloud")
        time.sleep(1.0)  # traffic goes on with the edge alone
    print(traffic.summary())
    check_outcomes(traffic)
    assert traffic.ok(), traffic.summary()
    # A cold worker has not even built the model: all that was served, the edge served.
    assert {o.role for o in traffic.ok()} == {"edge"}, traffic.summary()

    # The coordinator keeps serving, on the edge.
    after = invoke(s.address, x, priority=2, deadline=3.0)
    assert after.served_by["role"] == "edge"
    wait_answered(s, traffic.sent + 1)


# -- 2. the edge agent dies while the cloud is ready; then everyone dies ---------------------------


def test_sigkill_edge_agent_with_cloud_ready(
    stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=30)

    plan = cycle([0, 1, 2, 0], deadline=3.0)
    with Traffic(s.address, x, plan, threads=4) as traffic:
        time.sleep(0.5)  # both sides serving
        s.kill("edge")
        killed_at = time.monotonic()  # dead and reaped: nothing sent later can reach it
        wait_no_workers(s, "edge")
        time.sleep(1.0)  # the cloud alone
    print(traffic.summary())
    check_outcomes(traffic)
    later = [o for o in traffic.outcomes if o.sent > killed_at]
    assert later, traffic.summary()
    assert {o.role for o in later if o.result is not None} <= {"cloud"}, traffic.summary()
    assert any(o.result is not None for o in later), traffic.summary()

    # Latency-critical work, edge gone and cloud ready: the cloud serves it.
    for _ in range(5):
        assert invoke(s.address, x, priority=0, deadline=3.0).served_by["role"] == "cloud"
    wait_answered(s, traffic.sent + 5)

    # No worker at all: UNAVAILABLE, with a time to retry after.
    s.kill("cloud")
    wait_no_workers(s)
    for priority in (0, 1, 2):
        with pytest.raises(Unavailable) as info:
            invoke(s.address, x, priority=priority, deadline=3.0)
        assert info.value.retry_after is not None and info.value.retry_after > 0
    with pytest.raises(Unavailable) as info:
        invoke(s.address, x, deadline=None)
    assert info.value.retry_after is not None and info.value.retry_after > 0


# -- 3. the coordinator restarts; workers drain on SIGTERM -----------------------------------------


def test_coordinator_restart_workers_reregister(
    stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=30)

    plan = cycle([0, 1, 2], deadline=2.0)
    with Traffic(s.address, x, plan, threads=3, concurrent=4, timeout=5.0) as traffic:
        time.sleep(0.5)
        s.kill("coordinator")  # SIGKILL: whatever was in flight is lost with it
        time.sleep(0.5)
        s.coordinator()  # same port; the workers must find it by themselves
        s.wait_workers("edge", 1, timeout=30)
        s.wait_workers("cloud", 1, state="ready", timeout=30)
        back_at = time.monotonic()
        time.sleep(3 * HEARTBEAT + 1.5)
    # The very same worker processes came back: they re-registered, nobody restarted them.
    assert s.procs["edge"].poll() is None and s.procs["cloud"].poll() is None, logs(s)
    print(traffic.summary())
    check_outcomes(traffic)
    # What was in flight ended explicitly (typically the client's own timeout)...
    assert traffic.errors(), f"nothing was in flight across the restart? {traffic.summary()}"
    # ... and the same clients are served again once the workers are back.
    again = [o for o in traffic.outcomes if o.sent > back_at + 3 * HEARTBEAT]
    assert again and any(o.result is not None for o in again), traffic.summary()
    for priority in (0, 1, 2):
        assert invoke(s.address, x, priority=priority).served_by["role"] in {"edge", "cloud"}


def test_sigterm_drains_idle_workers(stack: Stack, assets: dict[str, Path], x: np.ndarray) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=30)
    assert invoke(s.address, x, priority=1).served_by["role"] == "cloud"

    for name, role in (("cloud", "cloud"), ("edge", "edge")):
        seen = coordinator_log(s)
        s.kill(name, signal.SIGTERM)  # drain, DISCONNECT, exit
        assert s.procs[name].returncode == 0, s.log(name)
        wait_no_workers(s, role)
        # It said DISCONNECT on its way out, rather than going silent (liveness would say
        # "missed heartbeats").
        news = coordinator_log(s)[len(seen) :]
        assert f"worker {name} ({role}) removed: draining" in news, news
        if role == "cloud":
            assert invoke(s.address, x, priority=2).served_by["role"] == "edge"


def test_sigterm_edge_agent_under_load_drains(
    stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=30)

    plan = cycle([0, 0, 1, 2], deadline=3.0)  # latency-critical work keeps the edge busy
    with Traffic(s.address, x, plan, threads=6, pause=0.005) as traffic:
        time.sleep(0.5)
        s.kill("edge", signal.SIGTERM)  # finish what runs, DISCONNECT, exit 0
        drained_at = time.monotonic()
        wait_no_workers(s, "edge")
        time.sleep(0.5)
    print(traffic.summary())
    # Unavailable stays allowed here: a dispatch that reaches the agent while it drains is
    # answered UNAVAILABLE (see test_dispatch_refused_by_a_draining_worker_goes_elsewhere).
    check_outcomes(traffic)
    assert s.procs["edge"].returncode == 0, s.log("edge")
    assert "worker edge (edge) removed: draining" in coordinator_log(s), s.log("coordinator")
    later = [o for o in traffic.outcomes if o.sent > drained_at and o.result is not None]
    assert later and {o.role for o in later} == {"cloud"}, traffic.summary()
    wait_answered(s, traffic.sent)


def edge_generation(address: str, n: int) -> tuple[threading.Thread, list[Any]]:
    """Stream a generation of `n` tokens in a thread, latency-critical without proactive
    handoff (so it stays on the edge agent while there is one); return once its first piece
    came from the edge: the thread, and the pieces as they arrive."""
    pieces: list[Any] = []
    first_piece = threading.Event()

    def generation() -> None:
        with Client(address, timeout=60) as client:
            stream = client.stream(MODEL, PROMPT, max_new_tokens=n, priority=0,
                                   options={"handoff": False})  # fmt: skip
            for piece in stream:
                pieces.append(piece)
                first_piece.set()

    streamer = threading.Thread(target=generation, daemon=True)
    streamer.start()
    assert first_piece.wait(30), "the generation never started"
    assert pieces[0].role == "edge"
    return streamer, pieces


def test_sigterm_edge_agent_mid_request_finishes_it_and_new_work_goes_elsewhere(
    stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    """A real `cicada edge` SIGTERMed while it runs a request: it takes nothing new (a
    dispatch that reaches it while it drains is answered UNAVAILABLE and goes elsewhere),
    finishes what it runs, says DISCONNECT and exits 0."""
    s = stack
    s.coordinator()
    s.cloud(MODEL, assets["package"])
    s.wait_workers("cloud", 1, state="ready", timeout=30)
    # 100 ms a token: the 55-token generation below runs 5.5 s at least on the agent (the tiny
    # GPT-2's context is 64 tokens).
    s.edge(MODEL, assets["edge"], "edge", "--token-interval", "0.1")
    s.wait_workers("edge", 1)
    n = 55
    streamer, pieces = edge_generation(s.address, n)
    edge = s.procs["edge"]
    os.killpg(edge.pid, signal.SIGTERM)  # mid-request
    # Sent at once: the agent may not have handled the signal yet (it serves them), or be
    # draining (it refuses them, and they go to the cloud): served either way.
    racing = [outcome_of(s.address, x, priority=0, deadline=3.0) for _ in range(3)]
    s.wait_for(
        lambda st: {w["state"] for w in st["workers"] if w["role"] == "edge"} <= {"draining"},
        what="the edge agent draining (or gone)",
        timeout=30,
    )
    # Latency-critical work would go to the edge (the soonest side) were it not draining.
    during = [outcome_of(s.address, x, priority=0, deadline=3.0) for _ in range(5)]
    streamer.join(60)
    assert not streamer.is_alive(), "the generation never ended"
    assert edge.wait(30) == 0, s.log("edge")
    for outcome in racing:
        assert isinstance(outcome, InvokeResult), f"a ready cloud was there: {outcome!r}"
    for outcome in during:
        assert isinstance(outcome, InvokeResult), f"a ready cloud was there: {outcome!r}"
        assert outcome.served_by["role"] == "cloud", outcome.served_by
    # What it ran when told to stop, it finished: every token from the edge, none lost.
    assert [p.seq for p in pieces] == list(range(n))
    assert {p.role for p in pieces} == {"edge"}, [p.role for p in pieces]
    assert "worker edge (edge) removed: draining" in coordinator_log(s), s.log("coordinator")
    wait_answered(s, 1 + len(racing) + len(during))


# -- 3b. a frozen worker: presumed dead, then back with old work in its hands ---------------------


def test_frozen_edge_agent_is_replaced_and_its_late_results_discarded(
    stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    """SIGSTOP looks like death to the coordinator (its in-flight work moves to the cloud), but
    the process comes back after SIGCONT with results for requests already answered: those
    must be discarded, never a second reply."""
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"], "edge", "--token-interval", "0.1")
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=30)

    edge = s.procs["edge"]
    plan = cycle([0, 0, 1, 2], deadline=3.0)
    # Work certainly in the frozen agent's hands: a generation it paces at 100 ms a token (so
    # its 50 tokens take 5 s there, and it still has most to make when it thaws),
    # latency-critical without proactive handoff, so it stays on the edge until the edge is
    # presumed dead and then finishes on the cloud.
    n = 50
    with Traffic(s.address, x, plan, threads=4) as traffic:
        streamer, pieces = edge_generation(s.address, n)
        os.killpg(edge.pid, signal.SIGSTOP)
        try:
            wait_no_workers(s, "edge")  # missed heartbeats: dropped, its work re-routed
            time.sleep(0.5)
        finally:
            os.killpg(edge.pid, signal.SIGCONT)
        s.wait_workers("edge", 1, timeout=30)  # it notices the silence and registers again
        back_at = time.monotonic()
        # Served by the edge again (once the orphaned generation no longer fills it): a
        # bounded wait for that, not a fixed sleep.
        deadline = time.monotonic() + 30
        while not any(o.role == "edge" and o.sent > back_at for o in list(traffic.outcomes)):
            assert time.monotonic() < deadline, traffic.summary()
            time.sleep(0.1)
    streamer.join(60)
    assert not streamer.is_alive(), "the generation never ended"
    print(traffic.summary())
    check_outcomes(traffic)
    assert any(o.role == "edge" and o.sent > back_at for o in traffic.outcomes), traffic.summary()
    # The generation: every position once, edge then cloud (it outlived the frozen agent).
    roles = [p.role for p in pieces]
    k = roles.count("edge")
    assert [p.seq for p in pieces] == list(range(n)), roles
    assert roles == ["edge"] * k + ["cloud"] * (n - k) and 1 <= k < n, roles
    wait_answered(s, traffic.sent + 1)
    # Back from SIGSTOP, whatever the agent still sent for what it held (a piece of the
    # generation before it learns it must register again; whether one goes out first is a
    # race between its two threads) reached the coordinator and was dropped, never relayed:
    # no position twice above, no id twice in check_outcomes, one outcome per request sent.
    # The stale message itself, sent for certain and counted exactly, is the attacker of
    # tests/security/test_one_outcome.py::test_a_worker_that_registers_again_with_a_result_
    # in_flight_counts_once.
    status = s.status()
    print("late results discarded:", status["late_results"], "superseded:", status["superseded"])


# -- 4. deadlines nobody can meet ------------------------------------------------------------------


def test_deadlines_nobody_can_meet_end_without_running(
    stack: Stack,
    assets: dict[str, Path],
    x: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    s = stack
    s.coordinator()
    gate = tmp_path / "gate"
    gated_cloud(s, assets, monkeypatch, gate)  # no edge at all, and a cloud held cold
    s.wait_workers("cloud", 1, timeout=30)

    # Only a cold cloud: latency-critical work never waits for it (UNAVAILABLE, with the ETA
    # as retry-after); work that could wait has 1 ms, which no side can meet (TIMEOUT).
    # (Timeout of either side: on a loaded machine the SDK's own 0.5 s grace may run out
    # before the coordinator's TIMEOUT arrives; the coordinator's count is checked below.)
    cold = {p: outcome_of(s.address, x, priority=p, deadline=0.001) for p in (0, 1, 2)}
    critical = outcome_of(s.address, x, priority=0, deadline=5.0)
    assert cloud_states(s) == {"cold"}, logs(s)
    for p in (1, 2):
        assert isinstance(cold[p], Timeout), cold[p]
    # 1 ms may run out in the coordinator before the policy is asked: TIMEOUT is fine too.
    assert isinstance(cold[0], (Unavailable, Timeout)), cold[0]
    assert isinstance(critical, Unavailable), critical
    assert critical.retry_after is not None and critical.retry_after > 0
    wait_answered(s, 4)
    assert answered(s, route="none", status="TIMEOUT") >= 2, s.status()["requests"]

    # A ready cloud and no edge: 1 ms is still too short for the cloud's estimate, so work
    # that may wait is answered TIMEOUT by the policy, without a dispatch.
    gate.touch()
    s.wait_workers("cloud", 1, state="ready", timeout=60)
    ready = {p: outcome_of(s.address, x, priority=p, deadline=0.001) for p in (1, 2)}
    for p, outcome in ready.items():
        assert isinstance(outcome, Timeout), (p, outcome)
    wait_answered(s, 6)
    assert answered(s, route="none", status="TIMEOUT") >= 4, s.status()["requests"]
    assert answered(s, route="cloud") == 0, s.status()["requests"]  # never reached the cloud
    assert s.status()["late_results"] == 0, s.status()
    # Latency-critical work goes to the soonest side regardless of its budget (policy.choose),
    # so this one is dispatched with 0 ms left; the worker must answer TIMEOUT without running
    # it (seen directly in test_cloud_worker_returns_timeout_for_expired_dispatch_when_ready),
    # and the caller gets TIMEOUT either way.
    critical_late = outcome_of(s.address, x, priority=0, deadline=0.001)
    assert isinstance(critical_late, Timeout), critical_late
    wait_answered(s, 7)
    assert answered(s, route="cloud", status="OK") == 0, s.status()["requests"]

    # The cloud does serve work with a budget it can meet, and the count sees it.
    assert invoke(s.address, x, priority=1, deadline=10.0).served_by["role"] == "cloud"
    assert answered(s, route="cloud", status="OK") == 1


# -- 4b. the cloud worker itself, behind a stand-in coordinator ------------------------------------


# The stand-in heartbeats its worker only while the test reads from it, in the test's own
# process: on a CPU-burning machine that process can stall past 4 × 0.2 s, and the worker then
# rightly presumes its coordinator dead and abandons the dispatch under test. A 1 s interval
# (silence presumed death after ~4.4 s) keeps these tests about the worker, not the scheduler.
STAND_IN_HEARTBEAT = 1.0


@pytest.fixture
def stand_in() -> Iterator[StandInCoordinator]:
    c = StandInCoordinator(heartbeat=STAND_IN_HEARTBEAT)
    yield c
    c.close()


@pytest.fixture
def cloud_process(
    stand_in: StandInCoordinator, assets: dict[str, Path], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(tmp_path / "cloud.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cicada", "cloud", "--model", MODEL,
             "--package", str(assets["package"]), "--name", "cloud",
             "--coordinator", f"tcp://127.0.0.1:{stand_in.port}",
             "--heartbeat", str(STAND_IN_HEARTBEAT)],
            cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait(30)


def assert_not_run(result: Result) -> None:
    """A RESULT for work the worker never ran: no outputs, none of what a forward reports (a
    run one has outputs, see assert_run), and the reason is that it never started. (The
    runtime's compute_s is the handler's time, a wait for the weights included: no evidence.)"""
    assert result.outputs == [], result
    assert not {"during_load", "tokens"} & set(result.timings), result
    assert result.error.startswith("deadline passed before"), result


def assert_run(result: Result) -> None:
    assert result.status is Status.OK, result
    assert result.outputs and result.timings.get("compute_s", -1.0) >= 0, result


def test_cloud_worker_returns_timeout_for_expired_dispatch_when_ready(
    stand_in: StandInCoordinator, cloud_process: subprocess.Popen[bytes], x: np.ndarray
) -> None:
    c = stand_in
    until = time.monotonic() + 60
    c.expect(Ready, until)
    c.expect(Heartbeat, until, where=lambda m: m.state is not None and m.state.value == "ready")
    c.send(Dispatch(id="spent", model=MODEL, inputs=[x], timeout_ms=0))
    result = c.expect(Result, until)
    assert (result.id, result.status) == ("spent", Status.TIMEOUT)
    assert_not_run(result)
    assert result.timings == {}, result  # refused before the handler was even called
    c.send(Dispatch(id="fine", model=MODEL, inputs=[x], timeout_ms=10_000))
    result = c.expect(Result, until)
    assert (result.id, result.status) == ("fine", Status.OK)
    assert_run(result)  # the control: what a run dispatch does carry


def test_cold_cloud_worker_never_runs_a_dispatch_that_expired_while_it_loaded(
    stand_in: StandInCoordinator, cloud_process: subprocess.Popen[bytes], x: np.ndarray
) -> None:
    c = stand_in
    until = time.monotonic() + 60
    ready = c.expect(Ready, until)
    assert ready.state is not None and ready.state.value == "cold"
    # 300 ms: valid when sent, long gone before torch is even imported (~1.25 s here).
    c.send(Dispatch(id="expires-while-loading", model=MODEL, inputs=[x], timeout_ms=300))
    result = c.expect(Result, until)
    assert result.id == "expires-while-loading"
    assert result.status is Status.TIMEOUT, f"expired work was run: {result.status}"
    assert_not_run(result)
    c.expect(Heartbeat, until, where=lambda m: m.state is not None and m.state.value == "ready")
    c.send(Dispatch(id="fine", model=MODEL, inputs=[x], timeout_ms=10_000))
    assert_run(c.expect(Result, until, where=lambda m: m.id == "fine"))
