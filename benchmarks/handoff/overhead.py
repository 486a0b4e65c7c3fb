"""Part B: the coordinator's own cost: added latency, peak throughput, and its logic in process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from benchmarks.handoff.assets import make_identity_model
from benchmarks.handoff.common import (
    IDENTITY_MODEL,
    RecordingTransport,
    cpu_snapshot,
    fmt_s,
    integrity,
    machine_cpu,
    median,
    percentile,
    ratio,
)
from cicada.client import AsyncClient, AsyncZmqTransport, Client
from cicada.common.protocol import (
    SIGNATURE,
    Command,
    Disconnect,
    Dispatch,
    Heartbeat,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    decode,
    encode,
)
from cicada.common.sockets import configure
from cicada.errors import CallError
from cicada.testing import Stack, free_port

# -- B: the coordinator's own cost -------------------------------------------------------------


class DirectRouter:
    """A minimal stand-in coordinator for one agent: READY -> HEARTBEAT, then DISPATCH/RESULT.
    Built from cicada.common.protocol like the real one, so only the coordinator's logic is
    missing."""

    def __init__(self, endpoint: str, model: str, heartbeat_s: float) -> None:
        self.model = model
        self.heartbeat_s = heartbeat_s
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        configure(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.bind(endpoint)
        self.agent: bytes | None = None
        self.last_beat = 0.0

    def _handle_control(self, identity: bytes, message: Any) -> None:
        if isinstance(message, Ready):
            self.agent = identity
            self.sock.send_multipart([identity, *encode(Heartbeat())])
            self.last_beat = time.monotonic()
        elif identity != self.agent and not isinstance(message, Disconnect):
            self.sock.send_multipart(
                [identity, *encode(Disconnect(reason="unknown worker: register again"))]
            )

    def wait_agent(self, timeout: float = 30.0) -> None:
        self.agent = None
        deadline = time.monotonic() + timeout
        while self.agent is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not register with the direct ROUTER")
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            with contextlib.suppress(ProtocolError):
                self._handle_control(frames[0], decode(frames[1:]))

    def call(self, x: np.ndarray) -> float:
        """One DISPATCH -> RESULT round trip; seconds from encode to decoded result."""
        assert self.agent is not None
        key = uuid.uuid4().hex
        start = time.perf_counter()
        frames = encode(Dispatch(id=key, model=self.model, inputs=[x]))
        self.sock.send_multipart([self.agent, *frames], copy=False)
        while True:
            raw = self.sock.recv_multipart(copy=False)
            message = decode([f.buffer for f in raw[1:]])
            if isinstance(message, Result) and message.id == key:
                break
            self._handle_control(bytes(raw[0]), message)
        elapsed = time.perf_counter() - start
        if message.status.value != "OK":
            raise RuntimeError(f"direct call failed: {message.status.value} {message.error}")
        if time.monotonic() - self.last_beat > self.heartbeat_s:  # keep the agent's liveness
            self.sock.send_multipart([self.agent, *encode(Heartbeat())])
            self.last_beat = time.monotonic()
        return elapsed

    def close(self) -> None:
        self.sock.close(linger=0)


class RawClient:
    """The same raw DEALER code as the direct path, but talking REQUEST/REPLY to the
    coordinator."""

    def __init__(self, endpoint: str, model: str) -> None:
        self.model = model
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        configure(self.sock)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(endpoint)

    def call(self, x: np.ndarray) -> float:
        key = uuid.uuid4().hex
        start = time.perf_counter()
        self.sock.send_multipart(encode(Request(id=key, model=self.model, inputs=[x])), copy=False)
        while True:
            raw = self.sock.recv_multipart(copy=False)
            message = decode([f.buffer for f in raw])
            if isinstance(message, Reply) and message.id == key:
                break
        elapsed = time.perf_counter() - start
        if message.status.value != "OK":
            raise RuntimeError(f"coordinator call failed: {message.status.value} {message.error}")
        return elapsed

    def close(self) -> None:
        self.sock.close(linger=0)


def _drain(poller: zmq.Poller, timeout_ms: int) -> Iterator[tuple[Any, list[bytes]]]:
    """Every message waiting on the poller's sockets (after waiting up to `timeout_ms`)."""
    for sock, _ in poller.poll(timeout_ms):
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            yield sock, frames


def _relay_main(backend: str, frontend: str, heartbeat_s: float, stop: Any, ready: Any) -> None:
    """A zero-logic hop where the coordinator sits: REQUEST frames go on to the one agent as
    a DISPATCH, its RESULT comes back as the REPLY, byte for byte (the bodies decode as the
    other type: unknown fields are ignored). No decoding, validation, policy or metrics: the
    latency it adds over the direct path is the cost of one more process and two more ZeroMQ
    hops on this machine, which no coordinator logic can go below."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    back, front = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (back, front):
        configure(sock)
    back.bind(backend)
    front.bind(frontend)
    poller = zmq.Poller()
    poller.register(back, zmq.POLLIN)
    poller.register(front, zmq.POLLIN)
    beat = encode(Heartbeat())
    ready_cmd, result_cmd = bytes([Command.READY]), bytes([Command.RESULT])
    dispatch_cmd, reply_cmd = bytes([Command.DISPATCH]), bytes([Command.REPLY])
    agent: bytes | None = None
    client: bytes | None = None
    last_beat = 0.0
    while not stop.is_set():
        for sock, frames in _drain(poller, 100):
            if sock is front:
                client = frames[0]
                if agent is not None:
                    back.send_multipart([agent, SIGNATURE, dispatch_cmd, *frames[3:]])
            elif frames[2] == ready_cmd:
                agent = frames[0]
                back.send_multipart([agent, *beat])
                ready.set()
            elif frames[2] == result_cmd and client is not None:
                front.send_multipart([client, SIGNATURE, reply_cmd, *frames[3:]])
        now = time.monotonic()
        if agent is not None and now - last_beat > heartbeat_s:
            back.send_multipart([agent, *beat])
            last_beat = now
    back.close(linger=0)
    front.close(linger=0)


class Relay:
    """`_relay_main` in a process of its own, bound where the coordinator would be."""

    def __init__(self, backend: str, heartbeat_s: float) -> None:
        mp = multiprocessing.get_context("spawn")
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.stop, self.ready = mp.Event(), mp.Event()
        self.proc = mp.Process(
            target=_relay_main,
            args=(backend, self.frontend, heartbeat_s, self.stop, self.ready),
            daemon=True,
        )
        self.proc.start()

    def wait_agent(self, timeout: float = 60.0) -> None:
        if not self.ready.wait(timeout):
            raise TimeoutError("the agent did not register with the relay")

    def close(self) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def sdk_call(client: Client, x: np.ndarray) -> float:
    start = time.perf_counter()
    client.invoke(IDENTITY_MODEL, x)
    return time.perf_counter() - start


def time_calls(
    call: Any, x: np.ndarray, n: int, warmup: int, pids: dict[str, int], cpu: dict[str, list[float]]
) -> list[float]:
    """`n` sequential calls after `warmup`; appends each process's CPU µs per call to `cpu`."""
    for _ in range(warmup):
        call(x)
    before = cpu_snapshot(pids)
    samples = [call(x) for _ in range(n)]
    after = cpu_snapshot(pids)
    for name, value in after.items():
        if name in before:
            cpu.setdefault(name, []).append(1e6 * (value - before[name]) / n)
    return samples


def measure_overhead(
    stack: Stack, model_dir: Path, rounds: int, n: int, warmup: int, console: Any
) -> dict[str, Any]:
    """Alternate direct / via-coordinator blocks on the same agent process."""
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    direct: list[list[float]] = []
    relayed: list[list[float]] = []
    via: list[list[float]] = []
    sdk: list[list[float]] = []
    cpu_direct: dict[str, list[float]] = {}
    cpu_via: dict[str, list[float]] = {}
    router = DirectRouter(stack.address, IDENTITY_MODEL, stack.heartbeat)
    agent = stack.edge(IDENTITY_MODEL, model_dir, "agent-1", "--capacity", "4")
    try:
        for r in range(rounds):
            router.wait_agent()
            pids = {"agent": agent.pid, "benchmark": os.getpid()}
            direct.append(time_calls(router.call, x, n, warmup, pids, cpu_direct))
            router.close()
            relay = Relay(stack.address, stack.heartbeat)
            try:
                relay.wait_agent()
                raw = RawClient(relay.frontend, IDENTITY_MODEL)
                try:
                    relayed.append(time_calls(raw.call, x, n, warmup, {}, {}))
                finally:
                    raw.close()
            finally:
                relay.close()
            coordinator = stack.coordinator()
            stack.wait_workers("edge", 1, timeout=60)
            pids["coordinator"] = coordinator.pid
            raw = RawClient(stack.address, IDENTITY_MODEL)
            try:
                via.append(time_calls(raw.call, x, n, warmup, pids, cpu_via))
            finally:
                raw.close()
            with Client(stack.address, timeout=10) as client:
                sdk.append(time_calls(lambda a, c=client: sdk_call(c, a), x, n, warmup, {}, {}))
            console.print(
                f"  round {r + 1}/{rounds}: p50 direct {fmt_s(median(direct[-1]))}, "
                f"via a zero-logic relay {fmt_s(median(relayed[-1]))}, "
                f"via coordinator {fmt_s(median(via[-1]))}, SDK Client {fmt_s(median(sdk[-1]))}"
            )
            if r < rounds - 1:
                stack.kill("coordinator", signal.SIGTERM)
                router = DirectRouter(stack.address, IDENTITY_MODEL, stack.heartbeat)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            router.close()

    def stats(blocks: list[list[float]]) -> dict[str, Any]:
        pooled = [v for block in blocks for v in block]
        return {
            "n": len(pooled),
            "p50_s": percentile(pooled, 50),
            "p90_s": percentile(pooled, 90),
            "p99_s": percentile(pooled, 99),
            "per_round_p50_s": [percentile(b, 50) for b in blocks],
            "per_round_p99_s": [percentile(b, 99) for b in blocks],
        }

    d, v, s, rl = stats(direct), stats(via), stats(sdk), stats(relayed)
    per_round = [
        (percentile(vb, 50) or 0) - (percentile(db, 50) or 0)
        for vb, db in zip(via, direct, strict=True)
    ]
    return {
        "rounds": rounds,
        "requests_per_block": n,
        "warmup_per_block": warmup,
        "direct": d,
        "via_coordinator": v,
        "sdk_client": s,
        "overhead_p50_s": v["p50_s"] - d["p50_s"],
        "overhead_p99_s": v["p99_s"] - d["p99_s"],
        "overhead_p50_per_round_s": per_round,
        # The same hop with no logic at all (see _relay_main): the floor under the overhead.
        "relay": rl,
        "relay_overhead_p50_s": rl["p50_s"] - d["p50_s"],
        "relay_overhead_p99_s": rl["p99_s"] - d["p99_s"],
        # CPU time per request of each process (median over rounds): what the coordinator's
        # hop costs in CPU, apart from the latency it adds.
        "cpu_us_per_request": {
            "direct": {k: median(v) for k, v in cpu_direct.items()},
            "via_coordinator": {k: median(v) for k, v in cpu_via.items()},
        },
        "via_over_direct_p50": ratio(v["p50_s"], d["p50_s"]),
        "samples": {"direct": direct, "relay": relayed, "via_coordinator": via, "sdk_client": sdk},
    }


def _loadgen_main(
    address: str, window: int, start_wall: float, warmup_s: float, duration_s: float, queue: Any
) -> None:
    queue.put(asyncio.run(_loadgen(address, window, start_wall, warmup_s, duration_s)))


async def _loadgen(
    address: str, window: int, start_wall: float, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """`window` coroutines, each one call at a time, until the window closes; then wait for
    every outstanding call. Counts completions inside [start+warmup, start+warmup+duration]."""
    import psutil

    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    transport = RecordingTransport(AsyncZmqTransport(address))
    client = AsyncClient(address, timeout=30.0, transport=transport)
    measure_from, stop_at = start_wall + warmup_s, start_wall + warmup_s + duration_s
    in_window = 0
    statuses: Counter[str] = Counter()
    sent_ids: list[str] = []
    latencies: list[float] = []
    await asyncio.sleep(max(0.0, start_wall - time.time()))
    me = psutil.Process()
    cpu0: float | None = None

    async def worker() -> None:
        nonlocal in_window, cpu0
        while (now := time.time()) < stop_at:
            if cpu0 is None and now >= measure_from:
                t = me.cpu_times()
                cpu0 = t.user + t.system
            start = time.perf_counter()
            try:
                result = await client.invoke(IDENTITY_MODEL, x)
                sent_ids.append(result.request_id)
                statuses["OK"] += 1
            except CallError as exc:
                sent_ids.append(exc.request_id or "")
                statuses[exc.status.value if exc.status is not None else type(exc).__name__] += 1
            end = time.time()
            if measure_from <= end < stop_at:
                in_window += 1
                if len(latencies) < 200_000:
                    latencies.append(time.perf_counter() - start)

    try:
        await asyncio.gather(*(worker() for _ in range(window)))
    finally:
        t = me.cpu_times()
        cpu1 = t.user + t.system
        await client.aclose()
    return {
        "completed_in_window": in_window,
        "statuses": dict(statuses),
        "integrity": integrity(sent_ids, transport.replies),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "cpu_s": None if cpu0 is None else cpu1 - cpu0,
    }


def run_throughput(
    stack: Stack,
    agents: int,
    clients: int,
    window: int,
    warmup_s: float,
    duration_s: float,
    profile: Path | None,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_wall = time.time() + 3.0  # time for the spawned interpreters to import
    procs = [
        ctx.Process(
            target=_loadgen_main,
            args=(stack.address, window, start_wall, warmup_s, duration_s, queue),
        )
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    pids = {"coordinator": stack.procs["coordinator"].pid}
    pids.update({name: proc.pid for name, proc in stack.procs.items() if name.startswith("agent")})
    time.sleep(max(0.0, start_wall + warmup_s - time.time()))
    cpu0 = cpu_snapshot(pids)
    machine0 = machine_cpu()
    spy = None
    if profile is not None:
        spy = start_py_spy(pids["coordinator"], duration_s, profile)
    time.sleep(max(0.0, start_wall + warmup_s + duration_s - time.time()))
    cpu1 = cpu_snapshot(pids)
    machine1 = machine_cpu()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    if spy is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)
    completed = sum(r["completed_in_window"] for r in results)
    counts: dict[str, int] = Counter()
    for r in results:
        counts.update(r["integrity"])
    rps = completed / duration_s
    cpu: dict[str, float | None] = {name: cpu1[name] - cpu0[name] for name in cpu1 if name in cpu0}
    cpu["clients"] = sum(r["cpu_s"] or 0.0 for r in results)
    busy = machine1[0] - machine0[0]
    wall = machine1[1] - machine0[1]
    ours = sum(v or 0.0 for k, v in cpu.items() if ":" not in k)
    return {
        "agents": agents,
        "agent_capacity": 4,
        "clients": clients,
        "window_per_client": window,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "completed": completed,
        "requests_per_s": rps,
        "statuses": dict(sum((Counter(r["statuses"]) for r in results), Counter())),
        "integrity": dict(counts),
        "latency_p50_s": median([r["latency_p50_s"] for r in results if r["latency_p50_s"]]),
        "latency_p99_s": max((r["latency_p99_s"] or 0.0 for r in results), default=None),
        "cpu_s": cpu,
        # Over the measuring window: the whole machine's busy cores, and the part of them that
        # is not this benchmark's processes (other tenants of this shared machine).
        "machine_busy_cores": busy / wall if wall > 0 else None,
        "other_busy_cores": max(0.0, busy - ours) / wall if wall > 0 else None,
        "cpu_us_per_request": {
            name: (None if v is None or not completed else 1e6 * v / completed)
            for name, v in cpu.items()
        },
    }


STAND_IN_MODEL = "identity-stand-in"  # served only by the stand-in agents below


def run_lean_throughput(
    stack: Stack, agents: int, capacity: int, window: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Coordinator-bound throughput: one client and `agents` stand-in agents as raw DEALER
    sockets in this process. The client keeps `window` pre-encoded REQUESTs outstanding; each
    agent registers (READY, like `cicada edge`) and echoes each DISPATCH's tensor back as its
    RESULT (the Identity model, without onnxruntime or executor threads). What remains is the
    coordinator's own work per request, plus this one lean process; the full-stack run above
    (SDK AsyncClient, `cicada edge` agents) shares the same 2 cores among many more processes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    total = int((warmup_s + duration_s) * 20_000) + window  # more than this machine can do
    requests = [
        encode(Request(id=f"lean-{i:x}", model=STAND_IN_MODEL, inputs=[x])) for i in range(total)
    ]
    socks: list[zmq.Socket[bytes]] = []
    registered = stack.workers("edge")
    for a in range(agents):
        sock = ctx.socket(zmq.DEALER)
        configure(sock)
        sock.connect(stack.address)
        sock.send_multipart(encode(Ready(
            role=Role.EDGE, worker=f"stand-in-{a}", models=[STAND_IN_MODEL], capacity=capacity,
            variant="identity",
        )))  # fmt: skip
        socks.append(sock)
    stack.wait_workers("edge", registered + agents, timeout=30)
    client = ctx.socket(zmq.DEALER)
    configure(client)
    client.connect(stack.address)
    poller = zmq.Poller()
    for sock in [*socks, client]:
        poller.register(sock, zmq.POLLIN)
    beat = encode(Heartbeat())
    pids = {"coordinator": stack.procs["coordinator"].pid}
    replies: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    sent = in_window = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    next_beat = start
    cpu0: dict[str, float] | None = None
    cpu1: dict[str, float] | None = None
    own0 = own1 = 0.0
    machine0 = machine1 = (0.0, 0.0)
    while sent < window:
        client.send_multipart(requests[sent])
        sent += 1
    while True:
        now = time.perf_counter()
        if cpu0 is None and now >= measure_from:
            cpu0, own0, machine0 = cpu_snapshot(pids), time.process_time(), machine_cpu()
        if now >= stop_at and sum(replies.values()) >= sent:
            break
        if now >= next_beat:  # liveness: a worker silent for 4 intervals is dropped
            for sock in socks:
                sock.send_multipart(beat)
            next_beat = now + 0.25
        for sock, frames in _drain(poller, 100):
            if sock is client:
                body = msgpack.unpackb(frames[2])
                replies[body["id"]] += 1
                statuses[body["status"]] += 1
                done = time.perf_counter()
                if measure_from <= done < stop_at:
                    in_window += 1
                if done < stop_at and sent < total:
                    client.send_multipart(requests[sent])
                    sent += 1
            elif frames[1] == bytes([Command.DISPATCH]):
                body = msgpack.unpackb(frames[2])
                result = {"id": body["id"], "status": "OK", "tensors": body["tensors"],
                          "variant": "identity", "timings": {"compute_s": 0.0}}  # fmt: skip
                sock.send_multipart(
                    [SIGNATURE, bytes([Command.RESULT]), msgpack.packb(result), *frames[3:]]
                )
        if cpu0 is not None and cpu1 is None and time.perf_counter() >= stop_at:
            cpu1, own1, machine1 = cpu_snapshot(pids), time.process_time(), machine_cpu()
    for sock in socks:
        sock.send_multipart(encode(Disconnect(reason="done")))
        sock.close(linger=100)
    client.close(linger=0)
    if cpu0 is None or cpu1 is None:
        raise RuntimeError("the stand-in throughput run did not cover its measuring window")
    completed = in_window
    cpu: dict[str, float | None] = {k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
    cpu["load generator"] = own1 - own0
    busy, wall = machine1[0] - machine0[0], machine1[1] - machine0[1]
    ours = sum(v or 0.0 for k, v in cpu.items() if ":" not in k)
    per = {k: (None if v is None or not completed else 1e6 * v / completed) for k, v in cpu.items()}
    coordinator_us = per.get("coordinator")
    ids = [f"lean-{i:x}" for i in range(sent)]
    return {
        "mode": "stand-in agents and client in one process",
        "agents": agents,
        "agent_capacity": capacity,
        "window": window,
        "duration_s": duration_s,
        "requests_per_s": completed / duration_s,
        "statuses": dict(statuses),
        "integrity": integrity(ids, replies),
        "cpu_s": cpu,
        "cpu_us_per_request": per,
        # What one core could carry if it ran only the coordinator, at this CPU per request.
        "coordinator_core_ceiling_rps": None if not coordinator_us else 1e6 / coordinator_us,
        "machine_busy_cores": busy / wall if wall > 0 else None,
        "other_busy_cores": max(0.0, busy - ours) / wall if wall > 0 else None,
    }


def start_py_spy(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("--profile: py-spy is not installed (pip install py-spy); skipping", flush=True)
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
           "--rate", "250", "--format", "raw", "--nonblocking", "--idle",
           "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _function(frame: str) -> str:
    """py-spy's "name (file:line)" -> "name (file)": one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize_profile(path: Path, cpu_us_per_request: float | None, top: int = 20) -> Any:
    """Where the coordinator's serving loop spends its busy samples, from py-spy's collapsed
    stacks: inclusive and self shares per function, and (times the coordinator's measured CPU
    per request) microseconds per request. Samples idle in zmq poll are counted apart."""
    if not path.exists():
        return None
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        loop = [i for i, f in enumerate(frames) if f.startswith("Coordinator.serve_forever ")]
        if not loop:
            continue  # other threads: the metrics HTTP server
        total += count
        frames = frames[loop[-1] :]
        if frames[-1].startswith("Poller.poll "):
            idle += count
            continue
        own[_function(frames[-1])] += count
        for f in {_function(f) for f in frames}:
            inclusive[f] += count
    busy = total - idle
    if not busy:
        return None

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "function": f,
                "share_of_busy": n / busy,
                "us_per_request": None
                if cpu_us_per_request is None
                else cpu_us_per_request * n / busy,
            }
            for f, n in counter.most_common(top)
        ]

    return {
        "samples_main_thread": total,
        "idle_in_poll_share": idle / total,
        "inclusive_top": rows(inclusive),
        "self_top": rows(own),
    }


class _Sink:
    """Stands in for the coordinator's ROUTER: keeps what it is given, sends nothing."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []
        self._parts: list[Any] = []

    def send_multipart(
        self, frames: Any, flags: int = 0, copy: bool = True, track: bool = False
    ) -> None:
        self.sent.append(frames)

    def send(self, frame: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        self._parts.append(frame)
        if not flags & zmq.SNDMORE:  # the message's last frame
            self.sent.append(self._parts)
            self._parts = []

    def close(self, linger: int = 0) -> None:
        pass


def _frames(message: Any, identity: bytes) -> list[Any]:
    """A message as serve_forever hands it to handle(): identity first, frames as buffers."""
    return [identity, *(f if isinstance(f, memoryview) else memoryview(f) for f in encode(message))]


def coordinator_logic_cost(
    queued: int, n: int, agents: int = 2, capacity: int = 4, profile: bool = False
) -> dict[str, Any]:
    """CPU per request of the coordinator's own logic (edge/coordinator/), in this process,
    without sockets.

    Steady state of a loaded coordinator: every agent slot is busy and `queued` requests wait.
    One cycle = a RESULT comes in (handle, expire_requests, dispatch: a waiting request takes
    the slot) and a new REQUEST comes in (handle, expire_requests, dispatch), exactly what
    serve_forever does per message when messages arrive one per poll. The ROUTER is replaced by
    a sink, so this is Python logic only (decode, policy, bookkeeping, metrics, encode).
    """
    import cProfile
    import pstats
    from collections import deque

    from cicada.common.protocol import Role, Status
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig

    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    sink = _Sink()
    node = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:0"))
    node._sock = sink  # type: ignore[assignment]  # the only socket it uses
    for a in range(agents):
        ready = Ready(role=Role.EDGE, worker=f"a{a}", models=[IDENTITY_MODEL], capacity=capacity)
        node.handle(_frames(ready, f"agent{a}".encode()))
    fill = agents * capacity + queued
    requests = [
        _frames(Request(id=f"r{i:09d}", model=IDENTITY_MODEL, inputs=[x]), b"client")
        for i in range(fill + n)
    ]
    running: deque[tuple[bytes, str]] = deque()

    def collect() -> None:
        for frames in sink.sent:
            if bytes(frames[2]) == b"\x20":  # DISPATCH
                running.append((bytes(frames[0]), msgpack.unpackb(bytes(frames[3]))["id"]))
        sink.sent.clear()

    clock = time.monotonic
    for frames in requests[:fill]:
        node.handle(frames)
        node.dispatch(clock())
    collect()
    if (
        len(running) != agents * capacity
        or sum(len(q) for q in node.queues[IDENTITY_MODEL].values()) != queued
    ):
        raise RuntimeError("the coordinator did not reach the intended steady state")
    phases = dict.fromkeys(
        ("result_in", "dispatch_after_result", "request_in", "dispatch_after_request"), 0.0
    )
    profiler = cProfile.Profile() if profile else None
    tt = time.thread_time
    for frames in requests[fill:]:
        identity, key = running.popleft()
        result = _frames(
            Result(id=key, status=Status.OK, outputs=[x], variant="identity"), identity
        )
        if profiler is not None:
            profiler.enable()
        t0 = tt()
        node.handle(result)
        t1 = tt()
        node.expire_requests(clock())
        node.dispatch(clock())
        t2 = tt()
        node.handle(frames)
        t3 = tt()
        node.expire_requests(clock())
        node.dispatch(clock())
        t4 = tt()
        if profiler is not None:
            profiler.disable()
        phases["result_in"] += t1 - t0
        phases["dispatch_after_result"] += t2 - t1
        phases["request_in"] += t3 - t2
        phases["dispatch_after_request"] += t4 - t3
        collect()
    out: dict[str, Any] = {
        "queued": queued,
        "requests": n,
        "phases_us": {k: 1e6 * v / n for k, v in phases.items()},
        "cpu_us_per_request": 1e6 * sum(phases.values()) / n,
    }
    if profiler is not None:
        stats = pstats.Stats(profiler)
        entries = stats.stats  # type: ignore[attr-defined]
        total = sum(tt_ for (_, _, tt_, _, _) in entries.values())
        rows = []
        for (file, line, name), (_, calls, own, cum, _) in entries.items():
            short = f"{name} ({Path(file).parent.name}/{Path(file).name})" if line else name
            rows.append((short, calls / n, own / total, cum / total))
        out["profile_cumulative_share"] = [
            {"function": f, "calls_per_request": round(c, 2), "share": round(cum, 4)}
            for f, c, _, cum in sorted(rows, key=lambda r: -r[3])
            if "coordinator_logic_cost" not in f
            and "profiler" not in f.lower()
            and "thread_time" not in f
            and "time.monotonic" not in f
            and "_frames" not in f
        ][:25]
    return out


def measure_logic(quick: bool) -> dict[str, Any]:
    backlogs = (0, 32) if quick else (0, 8, 32, 128, 512)
    out: dict[str, Any] = {"agents": 2, "capacity": 4, "by_backlog": []}
    try:
        for queued in backlogs:
            n = 300 if quick else (2000 if queued <= 128 else 500)
            out["by_backlog"].append(coordinator_logic_cost(queued, n))
        out["profile_q0"] = coordinator_logic_cost(0, 300 if quick else 2000, profile=True)
        if not quick:
            out["profile_q128"] = coordinator_logic_cost(128, 500, profile=True)
    except Exception as exc:  # it drives Coordinator internals: report, don't sink the run
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def measure_coordinator(
    work: Path, quick: bool, args: argparse.Namespace, console: Any
) -> dict[str, Any]:
    model_dir = make_identity_model(work / "identity")
    port = free_port()
    with Stack(work / "stack", heartbeat=0.5, port=port) as stack:
        stack.work.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]B1[/] added latency: {args.overhead_rounds} rounds x "
                      f"{args.overhead_requests} sequential requests per path")  # fmt: skip
        overhead = measure_overhead(
            stack, model_dir, args.overhead_rounds, args.overhead_requests,
            args.overhead_warmup, console,
        )  # fmt: skip
        throughput = []
        runs = [(1, w) for w in args.windows] + [(2, w) for w in args.windows]
        for i, (agents, window) in enumerate(runs):
            if agents == 2 and "agent-2" not in stack.procs:
                stack.edge(IDENTITY_MODEL, model_dir, "agent-2", "--capacity", "4")
                stack.wait_workers("edge", 2, timeout=60)
            last = i == len(runs) - 1
            profile = work / f"py-spy-coordinator-{agents}agents-w{window}.txt"
            profile = profile if args.profile and last else None
            console.print(
                f"[bold]B2[/] throughput: {agents} agent(s), {args.clients} client "
                f"process(es) x window {window}, {args.throughput_s:g} s"
            )
            t = run_throughput(
                stack, agents, args.clients, window, args.throughput_warmup,
                args.throughput_s, profile,
            )  # fmt: skip
            if profile is not None:
                t["profile"] = summarize_profile(profile, t["cpu_us_per_request"]["coordinator"])
                t["profile_file"] = profile.name
            throughput.append(t)
            console.print(
                f"  {t['requests_per_s']:.0f} requests/s, statuses {t['statuses']}, "
                f"other tenants {t['other_busy_cores']:.2f} cores"
            )
        lean = []
        for window in args.windows:
            console.print(
                f"[bold]B2[/] coordinator-bound throughput: 2 stand-in agents x 4 and a raw "
                f"client with window {window}, in one process, {args.throughput_s:g} s"
            )
            t = run_lean_throughput(stack, 2, 4, window, args.throughput_warmup, args.throughput_s)
            lean.append(t)
            console.print(
                f"  {t['requests_per_s']:.0f} requests/s, coordinator "
                f"{t['cpu_us_per_request']['coordinator']:.0f} µs CPU per request, statuses "
                f"{t['statuses']}, other tenants {t['other_busy_cores']:.2f} cores"
            )
        metrics = stack.status()
    console.print(
        "[bold]B3[/] coordinator logic in process, no sockets: CPU per request vs backlog"
    )
    return {
        "overhead": overhead,
        "throughput": throughput,
        "throughput_stand_in": lean,
        "logic": measure_logic(quick),
        "coordinator_metrics": {
            "malformed": metrics.get("malformed"),
            "late_results": metrics.get("late_results"),
        },
    }


def plot_overhead(overhead: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, key, color in (
        ("direct (stand-in ROUTER)", "direct", "#3aa655"),
        ("via coordinator (raw DEALER)", "via_coordinator", "#3b7dd8"),
        ("via coordinator (SDK Client)", "sdk_client", "#8e6bbf"),
    ):
        values = np.sort(np.asarray([v for b in overhead["samples"][key] for v in b])) * 1e6
        ax.plot(values, np.linspace(0, 1, len(values)), color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency (µs), one request in flight")
    ax.set_ylabel("CDF")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title(
        f"Identity [1,16] on one edge agent: coordinator adds "
        f"{overhead['overhead_p50_s'] * 1e6:.0f} µs p50, "
        f"{overhead['overhead_p99_s'] * 1e6:.0f} µs p99",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
