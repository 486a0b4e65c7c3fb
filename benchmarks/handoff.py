#!/usr/bin/env python3
"""Handoff benchmark: routing policies on a bursty trace, and the coordinator's own cost.

    python3 benchmarks/handoff.py                       # GPT-2-medium, 3 bursts, 6 s throughput
    python3 benchmarks/handoff.py --quick               # tiny GPT-2, 1 short burst: a smoke test
    python3 benchmarks/handoff.py --rate 4 --out results/handoff-rate4

Every role is a real process (`python -m cicada coordinator|edge|cloud`, via tests/stack.py) on
loopback ports; this script is only the load generator and the stopwatch.

A. Policies on a bursty trace. Bursts of Poisson arrivals with mixed priorities (30% critical:
   priority 0, deadline 0.5 s; 50% normal: 1, 2 s; 20% quality: 2, 5 s), sent open loop with
   `AsyncClient` at the trace times, through three deployments of the same coordinator:
   `cloud-only` (only a cloud worker; every request is sent as priority 2 with a long deadline
   so it waits for the cold start; attainment is still judged on the class deadline),
   `edge-only` (only the edge agent) and `cooperative` (both).
   Scale-to-zero is emulated HERE, not by the coordinator (the coordinator-driven lifecycle is
   a later issue): a fresh `cicada cloud` process is started at each burst's first request and
   stopped with SIGTERM once the burst is answered and a keep-alive has passed idle; bursts are
   separated by idle gaps longer than the keep-alive, so every burst meets a cold cloud. The
   cloud is "ready" when its log says "<model> resident" (the line follows the READY
   heartbeat it sends the coordinator). A client here follows `retry_after` on UNAVAILABLE
   (what a cloud-only caller sees before the cold worker has even registered), within the
   request's deadline; every attempt is a request of its own in the exactly-once count.
B. The coordinator's own cost, with a trivial ONNX model (Identity, float32 [1, 16]) served by a
   `cicada edge` agent (capacity 4). (1) Added latency: the same agent process is measured
   through the coordinator and directly, alternating in rounds: for the direct path this script
   binds a minimal ROUTER on the coordinator's port that plays the coordinator (answers READY,
   sends DISPATCH, reads RESULT); the agent reconnects to whichever is bound. Both paths use the
   same raw DEALER code here (encode, send, receive, decode), one request in flight;
   overhead = p50(via coordinator) - p50(direct), and p99 likewise. The SDK `Client` is timed
   too, for reference, and so is a zero-logic relay in the coordinator's place (forwards with
   the command byte rewritten: the floor that the extra process and hops set). (2) Peak
   throughput with tiny payloads: `--clients` load-generator processes, each an `AsyncClient`
   with `--window` calls outstanding, against 1 and then 2 agents; requests/s over the
   measuring window, and each process's CPU time per request. Then coordinator-bound: a raw
   client and two stand-in echo agents in one lean process (`run_lean_throughput`), which is
   what the throughput target is judged on. (3) The coordinator's logic in process, no sockets.

Writes <out>/results.json (every request of part A, summaries, targets) and <out>/handoff.png
(latency vs arrival time per policy, coloured by who answered, cloud start/ready/stop marked)
and <out>/overhead.png (latency distributions of part B). The machine is shared and noisy:
compare figures taken in the same run (ratios, differences), never a lone absolute time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from cicada.client import AsyncClient, AsyncZmqTransport, Client  # noqa: E402
from cicada.common.protocol import (  # noqa: E402
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
from cicada.common.sockets import configure  # noqa: E402
from cicada.errors import ClientError, Timeout, TransportError, Unavailable  # noqa: E402
from tests.stack import Stack, free_port  # noqa: E402

POLICIES = ("cloud-only", "edge-only", "cooperative")
# class -> (priority, deadline in seconds); the mix is the share of each class in the trace.
CLASSES: dict[str, tuple[int, float]] = {
    "critical": (0, 0.5),
    "normal": (1, 2.0),
    "quality": (2, 5.0),
}
MIX = (("critical", 0.3), ("normal", 0.5), ("quality", 0.2))
CLOUD_ONLY_DEADLINE_S = 300.0  # cloud-only requests are sent as priority 2 with this budget
CLIENT_TIMEOUT_S = CLOUD_ONLY_DEADLINE_S + 30.0
IDENTITY_MODEL = "identity"
ROLE_COLORS = {"edge": "#3b7dd8", "cloud": "#e8a33d", "failed": "#d9534f"}
CLASS_MARKERS = {"critical": "o", "normal": "s", "quality": "^"}

TARGETS = {
    "overhead_p50_us": 300.0,
    "throughput_rps": 5000.0,
    "cooperative_p99_vs_edge": 1.1,
    "large_share_after_ready": 0.8,
}
GiB = 2**30


# -- small helpers -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.partition(":")[2].strip()
                break
    versions = {}
    for dist in ("pyzmq", "msgpack", "numpy", "onnxruntime", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    info["versions"] = versions
    info["libzmq"] = zmq.zmq_version()
    # The code measured: these files change while other work goes on; name the exact bytes.
    info["source_sha256"] = {
        name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:16]
        for name in ("edge/coordinator.py", "edge/policy.py", "common/worker.py",
                     "common/protocol.py", "cicada/client.py", "cloud/service.py")
        if (ROOT / name).exists()
    }  # fmt: skip
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def prime_memory(gib: float) -> None:
    """Allocate, touch and free `gib` GiB in a throwaway process: this VM hands freed memory
    back to its host and touching it again is ~15x slower, which a cold start would pay."""
    if gib > 0:
        code = f"import numpy as np; block = np.ones({int(gib * GiB) // 8}); del block"
        subprocess.run([sys.executable, "-c", code], check=True)


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall seconds), for utilisation over a window."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return float(busy), time.monotonic()


class CpuWindow:
    """Busy cores over a window: the whole machine, this benchmark's processes (itself and
    every child it has reaped), and the rest: other tenants of this shared machine."""

    def __init__(self) -> None:
        self._machine = machine_cpu()
        self._own = self._own_cpu()
        self._excluded = 0.0

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @contextlib.contextmanager
    def excluded(self) -> Any:
        """Work that is not the measurement (priming memory): not counted as ours."""
        start = self._own_cpu()
        try:
            yield
        finally:
            self._excluded += self._own_cpu() - start

    def close(self) -> dict[str, float | None]:
        busy, now = machine_cpu()
        wall = now - self._machine[1]
        if wall <= 0:
            return {"wall_s": wall, "machine_busy_cores": None, "benchmark_cores": None,
                    "other_busy_cores": None}  # fmt: skip
        ours = self._own_cpu() - self._own - self._excluded
        machine = (busy - self._machine[0]) / wall
        return {
            "wall_s": wall,
            "machine_busy_cores": machine,
            "benchmark_cores": ours / wall,
            "other_busy_cores": max(0.0, machine - ours / wall),
        }


def wait_quiet(threshold: float | None, console: Any, limit_s: float = 600.0) -> dict[str, Any]:
    """Wait (at most `limit_s`) until the 1-minute load average is below `threshold`."""
    start = time.monotonic()
    if threshold is not None:
        while (load := os.getloadavg()[0]) >= threshold and time.monotonic() - start < limit_s:
            console.print(f"  waiting for a quieter machine: load {load:.1f} >= {threshold:g}")
            time.sleep(15)
    return {"waited_s": round(time.monotonic() - start, 1), "loadavg": loadavg()}


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per process, and split by thread: `NAME:python` (the interpreter's threads)
    and `NAME:zmq` (libzmq's own I/O and reaper threads, named ZMQbg/* in /proc)."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            threads = proc.threads()
        except psutil.Error:
            continue
        out[name] = float(times.user + times.system)
        split = {f"{name}:python": 0.0, f"{name}:zmq": 0.0}
        for t in threads:
            try:
                comm = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                comm = ""
            split[f"{name}:zmq" if comm.startswith("ZMQbg") else f"{name}:python"] += (
                t.user_time + t.system_time
            )
        out.update(split)
    return out


def process_cpu_s(pid: int) -> float | None:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


class RecordingTransport:
    """Wraps the AsyncClient's transport and counts every reply id that comes back, so that
    lost and duplicated outcomes are counted at the socket, not inferred from the SDK."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent = 0
        self.replies: Counter[str] = Counter()
        self.unreadable = 0

    async def send(self, frames: Sequence[Any]) -> None:
        await self.inner.send(frames)
        self.sent += 1

    async def recv(self) -> list[Any]:
        frames: list[Any] = await self.inner.recv()
        try:
            body = msgpack.unpackb(bytes(frames[2]), raw=False)
            self.replies[str(body["id"])] += 1
        except Exception:  # not ours to judge here; the client decides what it is
            self.unreadable += 1
        return frames

    def close(self) -> None:
        self.inner.close()


def integrity(sent_ids: Sequence[str], replies: Counter[str]) -> dict[str, int]:
    """sent == outcomes with unique ids: every request got exactly one reply."""
    sent = set(sent_ids)
    return {
        "sent": len(sent_ids),
        "unique_sent_ids": len(sent),
        "outcomes": sum(replies[i] for i in sent),
        "unique_outcome_ids": sum(1 for i in sent if replies[i] > 0),
        "lost": sum(1 for i in sent if replies[i] == 0),
        "duplicates": sum(replies[i] - 1 for i in sent if replies[i] > 1),
        "stray": sum(n for i, n in replies.items() if i not in sent),
    }


def integrity_ok(counts: dict[str, int]) -> bool:
    return (
        counts["sent"] == counts["outcomes"] == counts["unique_outcome_ids"]
        and counts["unique_sent_ids"] == counts["sent"]
        and counts["lost"] == 0
        and counts["duplicates"] == 0
    )


# -- assets ------------------------------------------------------------------------------------


@dataclass
class Assets:
    model: str
    package: Path
    edge_dir: Path
    inputs: np.ndarray
    description: str


def gpt2_assets(quick: bool, cache: Path, work: Path, seq_len: int) -> Assets:
    from cicada.common.package import Manifest

    if quick:
        from tests.stack import make_assets

        (work / "tiny").mkdir(parents=True, exist_ok=True)
        paths = make_assets(work / "tiny")
        manifest = Manifest.load(paths["package"])
        package, edge_dir = paths["package"], paths["edge"]
        description = "tiny GPT-2 (tests/stack.py make_assets: 2x64, fp32 edge model)"
    else:
        from cicada.demo import ensure_package

        package = ensure_package("gpt2-medium", cache)
        edge_dir = cache / "edge" / "gpt2-medium-int8"
        if not (edge_dir / "edge_model.json").exists():
            from cicada.cloud.export_edge import export_edge

            print(f"exporting the int8 edge model into {edge_dir} (once, ~30 s)", flush=True)
            export_edge(package, edge_dir, int8=True, force=True)
        manifest = Manifest.load(package)
        edge_info = json.loads((edge_dir / "edge_model.json").read_text())
        description = (
            f"GPT-2-medium package ({manifest.total_bytes / 1e9:.2f} GB, "
            f"{len(manifest.stages)} stages) in the cloud; edge: {edge_info.get('variant')}"
        )
    config = manifest.architecture.config
    vocab = int(config.get("vocab_size", 50257))
    block = int(config.get("block_size", 1024))
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, vocab, size=(1, min(seq_len, block)), dtype=np.int64)
    return Assets("gpt2", package, edge_dir, inputs, description)


def make_identity_model(out: Path) -> Path:
    """An Identity graph on float32 [1, 16], with the edge_model.json EdgeModel.load reads."""
    import onnx
    from onnx import TensorProto, helper

    out.mkdir(parents=True, exist_ok=True)
    shape = [1, 16]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    spec = {"dtype": "float32", "shape": shape}
    info = {
        "source_factory": "onnx.helper Identity (benchmarks/handoff.py)",
        "source_config": {},
        "edge_config": {},
        "variant": "identity-f32x16",
        "input": {"name": "input", **spec},
        "output": {"name": "output", **spec},
        "int8": False,
        "tolerance": {},
        "copied_tensors": 0,
        "files": {
            "fp32": {
                "path": "model.onnx",
                "variant": "identity-f32x16",
                "bytes": (out / "model.onnx").stat().st_size,
            }
        },
        "measured": {},
        "exporter": "onnx.helper",
        "opset": 17,
    }
    (out / "edge_model.json").write_text(json.dumps(info, indent=1))
    return out


# -- A: policies on a bursty trace -----------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    index: int
    burst: int
    offset_s: float  # from the burst's first request
    cls: str
    priority: int
    deadline_s: float


def make_trace(bursts: int, per_burst: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` req/s within each burst; classes drawn from MIX."""
    rng = random.Random(seed)
    names, weights = zip(*MIX, strict=True)
    trace: list[Arrival] = []
    for b in range(bursts):
        t = 0.0
        for _ in range(per_burst):
            cls = rng.choices(names, weights)[0]
            priority, deadline = CLASSES[cls]
            trace.append(Arrival(len(trace), b, t, cls, priority, deadline))
            t += rng.expovariate(rate)
    return trace


@dataclass
class Outcome:
    index: int
    burst: int
    cls: str
    deadline_s: float  # the class deadline: what attainment is judged on
    sent_priority: int
    sent_deadline_s: float
    arrival_s: float  # when it was sent (first attempt), from the policy's origin
    scheduled_s: float  # when the trace said to send it
    latency_s: float
    status: str
    role: str = ""  # served_by role ("edge" / "cloud"), "" when not served
    variant: str = ""
    attempts: int = 1
    ids: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    ready_s: float | None = None  # this burst's cloud ready time (policy origin), if any
    ready_metrics_s: float | None = None  # the same, as the coordinator's metrics first showed


def parse_ready(log: Path, model: str, origin_wall: float) -> float | None:
    """The cloud worker's "<model> resident" log line, as seconds since the policy's origin."""
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if f" {model} resident" in line:
            try:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                continue
            return stamp.timestamp() - origin_wall
    return None


async def send_one(
    client: AsyncClient,
    assets: Assets,
    arrival: Arrival,
    policy: str,
    at: float,
    origin: float,
) -> Outcome:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - loop.time()))
    start = loop.time()
    if policy == "cloud-only":
        priority, budget = 2, CLOUD_ONLY_DEADLINE_S
    else:
        priority, budget = arrival.priority, arrival.deadline_s
    out = Outcome(
        index=arrival.index, burst=arrival.burst, cls=arrival.cls, deadline_s=arrival.deadline_s,
        sent_priority=priority, sent_deadline_s=budget, arrival_s=start - origin,
        scheduled_s=at - origin, latency_s=0.0, status="", attempts=0,
    )  # fmt: skip
    while True:
        out.attempts += 1
        remaining = budget - (loop.time() - start)
        try:
            result = await client.invoke(
                assets.model, assets.inputs, priority=priority, deadline=max(remaining, 1e-3)
            )
        except Unavailable as exc:
            out.ids.append(exc.request_id or "")
            wait = exc.retry_after if exc.retry_after is not None else 1.0
            if loop.time() - start + wait < budget:
                await asyncio.sleep(wait)  # what a caller following retry_after does
                continue
            out.status, out.error = "UNAVAILABLE", str(exc)
        except Timeout as exc:
            out.ids.append(exc.request_id or "")
            out.status = "TIMEOUT" if exc.side == "coordinator" else "CLIENT_TIMEOUT"
            out.role = (exc.served_by or {}).get("role", "")
            out.error = str(exc)
        except ClientError as exc:
            out.ids.append(exc.request_id or "")
            out.status = exc.status.value if exc.status is not None else "CLIENT_ERROR"
            out.role = (exc.served_by or {}).get("role", "")
            out.error = str(exc)
        except TransportError as exc:
            out.ids.append(exc.request_id or "")
            out.status, out.error = "TRANSPORT_ERROR", str(exc)
        else:
            out.ids.append(result.request_id)
            out.status = "OK"
            out.role = str(result.served_by.get("role", ""))
            out.variant = str(result.served_by.get("variant", ""))
            out.timings = {k: float(v) for k, v in result.timings.items()}
        break
    out.latency_s = loop.time() - start
    return out


@dataclass
class PolicyOptions:
    bursts: int
    keepalive_s: float
    gap_s: float
    heartbeat_s: float
    edge_capacity: int
    prime_gib: float
    cloud_threads: int | None
    pin: tuple[set[int], set[int]] | None = None  # (cores for everything else, for the cloud)


async def run_policy(
    policy: str, trace: list[Arrival], assets: Assets, opts: PolicyOptions, work: Path
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    usage = CpuWindow()
    original_affinity = os.sched_getaffinity(0)
    if opts.pin is not None:  # children inherit it: coordinator, edge agent, priming
        os.sched_setaffinity(0, opts.pin[0])
    try:
        return await _run_policy(policy, trace, assets, opts, work, usage)
    finally:
        os.sched_setaffinity(0, original_affinity)


def _spawn_cloud(stack: Stack, assets: Assets, name: str, opts: PolicyOptions) -> None:
    """Start a cloud worker; pinned to its own cores when asked (set on this thread only,
    which the forked child inherits), emulating a worker on another machine."""
    threads = opts.cloud_threads or (len(opts.pin[1]) if opts.pin is not None else None)
    extra = ["--threads", str(threads)] if threads else []
    if opts.pin is None:
        stack.cloud(assets.model, assets.package, name, *extra)
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, opts.pin[1])
    try:
        stack.cloud(assets.model, assets.package, name, *extra)
    finally:
        os.sched_setaffinity(0, mine)


async def watch_ready(stack: Stack, origin: float, stop: asyncio.Event) -> float | None:
    """When the coordinator's metrics first show a ready cloud worker (they are refreshed
    once per heartbeat interval, so this lags the coordinator's own view by up to one)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        if await loop.run_in_executor(None, stack.workers, "cloud", "ready") > 0:
            return loop.time() - origin
        await asyncio.sleep(0.05)
    return None


async def _run_policy(
    policy: str,
    trace: list[Arrival],
    assets: Assets,
    opts: PolicyOptions,
    work: Path,
    usage: CpuWindow,
) -> dict[str, Any]:
    uses_edge, uses_cloud = policy != "cloud-only", policy != "edge-only"
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    bursts: list[dict[str, Any]] = []
    with Stack(work, heartbeat=opts.heartbeat_s) as stack:
        stack.coordinator()
        if uses_edge:
            stack.edge(assets.model, assets.edge_dir, "edge", "--capacity", str(opts.edge_capacity))
            stack.wait_workers("edge", 1, timeout=120)
        transport = RecordingTransport(AsyncZmqTransport(stack.address))
        client = AsyncClient(stack.address, timeout=CLIENT_TIMEOUT_S, transport=transport)
        origin, origin_wall = loop.time(), time.time()
        load_before = loadavg()
        try:
            for b in range(opts.bursts):
                with usage.excluded():
                    prime_memory(opts.prime_gib)
                if b > 0:  # the idle gap: longer than the keep-alive, counted from the stop
                    idle = loop.time() - bursts[-1]["idle_from"]
                    await asyncio.sleep(max(0.0, opts.gap_s - idle))
                arrivals = [a for a in trace if a.burst == b]
                t0 = loop.time() + 0.02
                name = f"cloud-{b}"
                tasks = [
                    asyncio.create_task(
                        send_one(client, assets, a, policy, t0 + a.offset_s, origin)
                    )
                    for a in arrivals
                ]
                stop_watch = asyncio.Event()
                watcher = None
                if uses_cloud:  # spawned off the event loop, so the first send is on time
                    await asyncio.sleep(max(0.0, t0 - loop.time()))
                    await loop.run_in_executor(None, _spawn_cloud, stack, assets, name, opts)
                    watcher = asyncio.create_task(watch_ready(stack, origin, stop_watch))
                done = await asyncio.gather(*tasks)
                answered = loop.time()
                record: dict[str, Any] = {
                    "burst": b,
                    "first_request_s": t0 - origin,
                    "last_request_s": max(o.arrival_s for o in done),
                    "answered_s": answered - origin,
                    "requests": len(done),
                }
                if uses_cloud:
                    await asyncio.sleep(opts.keepalive_s)  # idle keep-alive, then scale to zero
                    stop = loop.time()
                    stack.kill(name, signal.SIGTERM)  # drains: finishes what runs, DISCONNECT
                    ready = parse_ready(stack.work / f"{name}.log", assets.model, origin_wall)
                    stop_watch.set()
                    ready_metrics = await watcher if watcher is not None else None
                    record.update(
                        cloud_started_s=t0 - origin,
                        cloud_ready_s=ready,
                        cloud_ready_metrics_s=ready_metrics,
                        cold_start_s=None if ready is None else ready - (t0 - origin),
                        cloud_stopped_s=stop - origin,
                        cloud_exit_code=stack.procs[name].returncode,
                    )
                    for o in done:
                        o.ready_s = ready
                        o.ready_metrics_s = ready_metrics
                record["idle_from"] = loop.time()
                bursts.append(record)
                outcomes.extend(done)
        finally:
            await client.aclose()
        sent_ids = [i for o in outcomes for i in o.ids]
        counts = integrity(sent_ids, transport.replies)
        counts["requests"] = len(outcomes)
        counts["unreadable_replies"] = transport.unreadable
        status = stack.status()
    cpu = usage.close()  # after the Stack reaped its processes: their CPU time is counted
    for record in bursts:
        record["idle_from"] = record["idle_from"] - origin
    summary = summarize_policy(policy, outcomes)
    summary.update(
        integrity=counts,
        bursts=bursts,
        loadavg_before=load_before,
        cpu=cpu,
        coordinator_metrics={
            "malformed": status.get("malformed"),
            "late_results": status.get("late_results"),
            "requests": status.get("requests"),
        },
        request_log=[asdict(o) for o in outcomes],
    )
    return summary


def latency_stats(rows: Sequence[Outcome]) -> dict[str, Any]:
    lat = [o.latency_s for o in rows]
    return {
        "n": len(rows),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else None,
    }


def summarize_policy(policy: str, rows: list[Outcome]) -> dict[str, Any]:
    ok = [o for o in rows if o.status == "OK"]
    n = len(rows)
    after_ready = [o for o in rows if o.ready_s is not None and o.arrival_s >= o.ready_s]
    after_ready_nc = [o for o in after_ready if o.cls != "critical"]
    after_metrics = [
        o for o in rows if o.ready_metrics_s is not None and o.arrival_s >= o.ready_metrics_s
    ]
    critical = [o for o in rows if o.cls == "critical"]
    # Served by the cloud although it arrived before the cloud was ready: it waited for the
    # cold start (a cloud that is not ready never answers before it is).
    critical_waited = [
        o for o in critical if o.role == "cloud" and (o.ready_s is None or o.arrival_s < o.ready_s)
    ]
    # Only requests dispatched after the cloud was ready: earlier ones include waiting for
    # stages to become resident in the worker's compute time.
    cloud_compute = [
        o.timings["compute_s"]
        for o in ok
        if o.role == "cloud"
        and "compute_s" in o.timings
        and o.ready_s is not None
        and o.arrival_s + o.timings.get("queue_s", 0.0) >= o.ready_s
    ]
    edge_compute = [
        o.timings["compute_s"] for o in ok if o.role == "edge" and "compute_s" in o.timings
    ]
    return {
        "policy": policy,
        "requests": n,
        "statuses": dict(Counter(o.status for o in rows)),
        "latency_ok": latency_stats(ok),
        "latency_all": latency_stats(rows),
        "by_class": {
            cls: {
                **latency_stats([o for o in ok if o.cls == cls]),
                "sent": sum(1 for o in rows if o.cls == cls),
                "attained": sum(1 for o in ok if o.cls == cls and o.latency_s <= o.deadline_s),
                "cloud": sum(1 for o in ok if o.cls == cls and o.role == "cloud"),
            }
            for cls in CLASSES
        },
        "deadline_attainment": (
            sum(1 for o in ok if o.latency_s <= o.deadline_s) / n if n else None
        ),
        "large_share": sum(1 for o in ok if o.role == "cloud") / n if n else None,
        "arrived_after_ready": len(after_ready),
        "large_share_after_ready": (
            sum(1 for o in after_ready if o.status == "OK" and o.role == "cloud") / len(after_ready)
            if after_ready
            else None
        ),
        "large_share_after_ready_metrics": (
            sum(1 for o in after_metrics if o.status == "OK" and o.role == "cloud")
            / len(after_metrics)
            if after_metrics
            else None
        ),
        "arrived_after_ready_metrics": len(after_metrics),
        "arrived_after_ready_noncritical": len(after_ready_nc),
        "large_share_after_ready_noncritical": (
            sum(1 for o in after_ready_nc if o.status == "OK" and o.role == "cloud")
            / len(after_ready_nc)
            if after_ready_nc
            else None
        ),
        "critical": len(critical),
        "critical_ok": sum(1 for o in critical if o.status == "OK"),
        "critical_waited_for_cold_start": len(critical_waited),
        "retries": sum(o.attempts - 1 for o in rows),
        "max_send_lag_s": max((o.arrival_s - o.scheduled_s for o in rows), default=None),
        "cloud_compute_median_s": median(cloud_compute),
        "edge_compute_median_s": median(edge_compute),
    }


def large_share_bound(summary: dict[str, Any]) -> float:
    """The most the large model can answer of the requests arriving after it is ready, on
    this machine: no more than its capacity share (one request per compute time, against the
    offered rate), and, when a cloud forward is slower than an edge one, no latency-critical
    request (the policy sends those to the side that answers soonest: the edge)."""
    bound = summary["cloud_capacity_share"]
    cloud_s, edge_s = summary["cloud_compute_median_s"], summary["edge_compute_median_s"]
    after, after_nc = summary["arrived_after_ready"], summary["arrived_after_ready_noncritical"]
    if edge_s is not None and cloud_s > edge_s and after:
        bound = min(bound, after_nc / after)
    return float(bound)


def plot_policies(policies: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(policies), 1, figsize=(11, 3.2 * len(policies)), squeeze=False)
    for ax, (policy, summary) in zip(axes[:, 0], policies.items(), strict=True):
        rows = summary["request_log"]
        for role in ("edge", "cloud", "failed"):
            for cls, marker in CLASS_MARKERS.items():
                pick = [
                    r for r in rows
                    if r["cls"] == cls
                    and ((r["status"] == "OK" and r["role"] == role)
                         or (role == "failed" and r["status"] != "OK"))
                ]  # fmt: skip
                if pick:
                    ax.scatter(
                        [r["arrival_s"] for r in pick], [r["latency_s"] for r in pick],
                        s=14, marker="x" if role == "failed" else marker,
                        color=ROLE_COLORS[role], alpha=0.8,
                        label=f"{role} · {cls}" if role != "failed" else f"not OK · {cls}",
                    )  # fmt: skip
        for i, burst in enumerate(summary["bursts"]):
            if "cloud_started_s" in burst:
                ax.axvline(burst["cloud_started_s"], color="#777777", ls=":", lw=1,
                           label="cloud process started" if i == 0 else None)  # fmt: skip
                if burst.get("cloud_ready_s") is not None:
                    ax.axvline(burst["cloud_ready_s"], color="#2e8b57", ls="--", lw=1.3,
                               label="cloud ready (resident)" if i == 0 else None)  # fmt: skip
                ax.axvline(burst["cloud_stopped_s"], color="#222222", ls="-.", lw=0.8,
                           label="cloud stopped (SIGTERM)" if i == 0 else None)  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("latency (s)")
        lat = summary["latency_ok"]
        ax.set_title(
            f"{policy}: p50 {fmt_s(lat['p50_s'])}, p99 {fmt_s(lat['p99_s'])}, "
            f"large model {fmt_pct(summary['large_share'])} "
            f"({fmt_pct(summary['large_share_after_ready'])} after ready), "
            f"attainment {fmt_pct(summary['deadline_attainment'])}",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6.5, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("arrival time (s since the policy's start)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
            except (ClientError, TransportError) as exc:
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
    """CPU per request of edge/coordinator.py's own logic, in this process, without sockets.

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
    from cicada.edge.coordinator import Coordinator, CoordinatorConfig

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


# -- targets and reporting ---------------------------------------------------------------------


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    pol = results["policies"]
    coop, edge = pol["cooperative"], pol["edge-only"]
    over = results["coordinator"]["overhead"]
    peak = max(results["coordinator"]["throughput"], key=lambda t: t["requests_per_s"])
    lean = results["coordinator"].get("throughput_stand_in") or [{"requests_per_s": 0.0}]
    lean_peak = max(lean, key=lambda t: t["requests_per_s"])
    p99_ratio = ratio(coop["latency_ok"]["p99_s"], edge["latency_ok"]["p99_s"])
    share = coop["large_share_after_ready"]
    every = [p["integrity"] for p in pol.values()]
    every += [t["integrity"] for t in results["coordinator"]["throughput"]]
    every += [t["integrity"] for t in results["coordinator"].get("throughput_stand_in", [])]
    lost = sum(c["lost"] for c in every)
    dup = sum(c["duplicates"] for c in every)
    sent = sum(c["sent"] for c in every)
    outcomes = sum(c["outcomes"] for c in every)
    return [
        {
            "target": "coordinator overhead p50 <= 300 µs",
            "measured": f"{over['overhead_p50_s'] * 1e6:.0f} µs "
            f"(p99 {over['overhead_p99_s'] * 1e6:.0f} µs; a zero-logic relay in its place adds "
            f"{(over.get('relay_overhead_p50_s') or 0) * 1e6:.0f} µs p50)",
            "pass": over["overhead_p50_s"] * 1e6 <= TARGETS["overhead_p50_us"],
        },
        {
            "target": ">= 5,000 requests/s through one coordinator",
            "measured": f"{lean_peak['requests_per_s']:.0f} requests/s coordinator-bound "
            f"(stand-in agents and client in one process; coordinator core ceiling "
            f"{lean_peak.get('coordinator_core_ceiling_rps') or 0:.0f}); full stack "
            f"{peak['requests_per_s']:.0f} ({peak['agents']} `cicada edge` agent(s), SDK client)",
            "pass": lean_peak["requests_per_s"] >= TARGETS["throughput_rps"],
        },
        {
            "target": "cooperative p99 <= 1.1 x edge-only p99",
            "measured": f"{fmt_s(coop['latency_ok']['p99_s'])} vs "
            f"{fmt_s(edge['latency_ok']['p99_s'])} = "
            + ("-" if p99_ratio is None else f"{p99_ratio:.2f}x"),
            "pass": None if p99_ratio is None else p99_ratio <= TARGETS["cooperative_p99_vs_edge"],
        },
        {
            "target": "large model answers >= 80% of requests arriving after it is ready",
            "measured": f"{fmt_pct(share)} of {coop['arrived_after_ready']} "
            f"({fmt_pct(coop['large_share_after_ready_noncritical'])} of the non-critical ones; "
            f"at most {fmt_pct(coop.get('large_share_bound'))} possible here: cloud capacity "
            f"{fmt_pct(coop.get('cloud_capacity_share'))} of the offered rate, and critical "
            "requests go to the faster edge; "
            f"ready per coordinator metrics: {fmt_pct(coop['large_share_after_ready_metrics'])} "
            f"of {coop['arrived_after_ready_metrics']})",
            "pass": None if share is None else share >= TARGETS["large_share_after_ready"],
        },
        {
            "target": "every latency-critical request answered without waiting for a cold start",
            "measured": f"{coop['critical_waited_for_cold_start']} of {coop['critical']} "
            f"waited ({coop['critical_ok']} answered OK; edge-only "
            f"{pol['edge-only']['critical_ok']})",
            "pass": coop["critical_waited_for_cold_start"] == 0,
        },
        {
            "target": "zero lost or duplicated outcomes (sent == outcomes, unique ids)",
            "measured": f"sent {sent}, outcomes {outcomes}, lost {lost}, duplicated {dup}",
            "pass": lost == 0 and dup == 0 and sent == outcomes,
        },
    ]


def print_report(results: dict[str, Any], console: Any) -> None:
    if "policies" in results:
        print_policies(results, console)
    if results["coordinator"] is not None:
        print_coordinator(results["coordinator"], console)
        print_logic(results["coordinator"].get("logic", {}), console)
    print_targets(results, console)


def print_policies(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"A. policies on a bursty trace — {results['config']['trace_description']}")
    for col in ("policy", "sent", "OK", "p50", "p99", "attainment", "large model",
                "after ready", "critical waited", "cold start (med)", "retries",
                "others' cores"):  # fmt: skip
        table.add_column(col, justify="right")
    for policy, s in results["policies"].items():
        cold = [b["cold_start_s"] for b in s["bursts"] if b.get("cold_start_s") is not None]
        table.add_row(
            policy, str(s["integrity"]["sent"]), str(s["statuses"].get("OK", 0)),
            fmt_s(s["latency_ok"]["p50_s"]), fmt_s(s["latency_ok"]["p99_s"]),
            fmt_pct(s["deadline_attainment"]), fmt_pct(s["large_share"]),
            f"{fmt_pct(s['large_share_after_ready'])} of {s['arrived_after_ready']} "
            f"({fmt_pct(s['large_share_after_ready_metrics'])} of "
            f"{s['arrived_after_ready_metrics']})",
            f"{s['critical_waited_for_cold_start']} of {s['critical']}",
            fmt_s(median(cold)), str(s["retries"]),
            "-" if s["cpu"]["other_busy_cores"] is None else f"{s['cpu']['other_busy_cores']:.2f}",
        )  # fmt: skip
    console.print(table)
    classes = Table(title="A. per class (OK replies): p50 / p99, deadline met, large model")
    classes.add_column("policy")
    for cls, (priority, deadline) in CLASSES.items():
        classes.add_column(f"{cls} (p{priority}, {deadline:g} s)", justify="right")
    for policy, s in results["policies"].items():
        cells = []
        for cls in CLASSES:
            c = s["by_class"][cls]
            cells.append(
                f"{fmt_s(c['p50_s'])} / {fmt_s(c['p99_s'])}; met {c['attained']}/{c['sent']}; "
                f"cloud {c['cloud']}"
            )
        classes.add_row(policy, *cells)
    console.print(classes)
    coop = results["policies"]["cooperative"]
    cap = coop.get("cloud_capacity_share")
    if cap is not None:
        console.print(
            f"Cloud compute (median, cooperative) {fmt_s(coop['cloud_compute_median_s'])} per "
            f"request at capacity 1 -> at most {1 / coop['cloud_compute_median_s']:.1f} req/s, "
            f"{fmt_pct(cap)} of the offered {results['config']['rate']:g} req/s; edge compute "
            f"(median) {fmt_s(coop['edge_compute_median_s'])}."
        )


def print_coordinator(coordinator: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    over = coordinator["overhead"]
    lat = Table(title="B1. added latency, one request in flight (same agent process, rounds "
                      "alternated)")  # fmt: skip
    for col in ("path", "n", "p50", "p90", "p99", "p50 per round"):
        lat.add_column(col, justify="right")
    for label, key in (("direct (stand-in ROUTER)", "direct"),
                       ("via a zero-logic relay (raw DEALER)", "relay"),
                       ("via coordinator (raw DEALER)", "via_coordinator"),
                       ("via coordinator (SDK Client)", "sdk_client")):  # fmt: skip
        s = over.get(key)
        if s is None:
            continue
        lat.add_row(label, str(s["n"]), fmt_s(s["p50_s"]), fmt_s(s["p90_s"]), fmt_s(s["p99_s"]),
                    ", ".join(fmt_s(v) for v in s["per_round_p50_s"]))  # fmt: skip
    lat.add_row("coordinator overhead", "", fmt_s(over["overhead_p50_s"]), "",
                fmt_s(over["overhead_p99_s"]),
                ", ".join(fmt_s(v) for v in over["overhead_p50_per_round_s"]))  # fmt: skip
    if over.get("relay"):
        lat.add_row("relay overhead (the hop alone)", "", fmt_s(over["relay_overhead_p50_s"]), "",
                    fmt_s(over["relay_overhead_p99_s"]), "")  # fmt: skip
    console.print(lat)
    cpu = over["cpu_us_per_request"]

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} µs"

    via_cpu = cpu["via_coordinator"]
    console.print(
        f"CPU per sequential request: coordinator {us(via_cpu.get('coordinator'))} "
        f"(Python threads {us(via_cpu.get('coordinator:python'))}, libzmq I/O thread "
        f"{us(via_cpu.get('coordinator:zmq'))}); agent {us(cpu['direct'].get('agent'))} direct / "
        f"{us(cpu['via_coordinator'].get('agent'))} via the coordinator; this script "
        f"{us(cpu['direct'].get('benchmark'))} / {us(cpu['via_coordinator'].get('benchmark'))}."
    )

    tp = Table(title="B2. peak throughput, tiny payloads (Identity float32 [1,16])")
    for col in ("agents x cap", "clients x window", "requests/s", "p50", "p99",
                "CPU µs/req: coordinator", "agents", "clients", "others' cores",
                "sent=outcomes"):  # fmt: skip
        tp.add_column(col, justify="right")
    for t in coordinator["throughput"]:
        per = t["cpu_us_per_request"]
        agents_us = sum(v or 0.0 for k, v in per.items() if k.startswith("agent") and ":" not in k)
        c = t["integrity"]
        tp.add_row(
            f"{t['agents']} x {t['agent_capacity']}", f"{t['clients']} x {t['window_per_client']}",
            f"{t['requests_per_s']:.0f}", fmt_s(t["latency_p50_s"]), fmt_s(t["latency_p99_s"]),
            "-" if per.get("coordinator") is None else f"{per['coordinator']:.0f}",
            f"{agents_us:.0f}", "-" if per.get("clients") is None else f"{per['clients']:.0f}",
            "-" if t["other_busy_cores"] is None else f"{t['other_busy_cores']:.2f}",
            f"{c['sent']}={c['outcomes']}" + ("" if integrity_ok(c) else " !"),
        )  # fmt: skip
    console.print(tp)
    for t in coordinator.get("throughput_stand_in", []):
        per = t["cpu_us_per_request"]
        c = t["integrity"]
        console.print(
            f"  coordinator-bound (stand-in agents {t['agents']} x {t['agent_capacity']} and "
            f"client, window {t['window']}, one process): {t['requests_per_s']:.0f} requests/s; "
            f"CPU µs/request: coordinator {per['coordinator']:.0f} (ceiling on one core "
            f"{t['coordinator_core_ceiling_rps']:.0f} req/s), load generator "
            f"{per['load generator']:.0f}; others' cores {t['other_busy_cores']:.2f}; "
            f"sent=outcomes {c['sent']}={c['outcomes']}" + ("" if integrity_ok(c) else " !")
        )
    for t in coordinator["throughput"]:
        per = t["cpu_us_per_request"]
        if per.get("coordinator:python") is not None:
            console.print(
                f"  {t['agents']} agent(s), window {t['window_per_client']}: coordinator CPU "
                f"{per['coordinator']:.0f} µs/request = Python threads "
                f"{per['coordinator:python']:.0f} + libzmq I/O thread {per['coordinator:zmq']:.0f}"
            )
    for t in coordinator["throughput"]:
        prof = t.get("profile")
        if prof:
            pt = Table(
                title=f"py-spy, coordinator main thread at {t['requests_per_s']:.0f} req/s "
                f"({prof['idle_in_poll_share']:.0%} of its samples idle in zmq poll)"
            )
            pt.add_column("function (inclusive, from the serving loop down)")
            pt.add_column("share of busy samples", justify="right")
            pt.add_column("CPU µs/request", justify="right")
            for row in prof["inclusive_top"][:20]:
                us = row["us_per_request"]
                pt.add_row(
                    row["function"],
                    f"{row['share_of_busy']:.1%}",
                    "-" if us is None else f"{us:.0f}",
                )
            console.print(pt)


def print_logic(logic: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if logic.get("error"):
        console.print(f"B3 failed: {logic['error']}")
    rows = logic.get("by_backlog", [])
    if not rows:
        return
    table = Table(
        title="B3. coordinator logic in process (no sockets): CPU µs per request, 2 agents x 4 "
        "slots busy, N requests queued"
    )
    for col in ("queued", "total", "RESULT in", "dispatch after it", "REQUEST in",
                "dispatch after it", "ceiling (1 core)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        ph = r["phases_us"]
        table.add_row(
            str(r["queued"]), f"{r['cpu_us_per_request']:.0f}", f"{ph['result_in']:.0f}",
            f"{ph['dispatch_after_result']:.0f}", f"{ph['request_in']:.0f}",
            f"{ph['dispatch_after_request']:.0f}",
            f"{1e6 / r['cpu_us_per_request']:.0f} req/s",
        )  # fmt: skip
    console.print(table)
    base = rows[0]["cpu_us_per_request"]
    for key, label in (("profile_q0", "nothing queued"), ("profile_q128", "128 queued")):
        prof = logic.get(key)
        if not prof:
            continue
        queued = 0 if key == "profile_q0" else 128
        measured = [r["cpu_us_per_request"] for r in rows if r["queued"] == queued]
        cpu = measured[0] if measured else base
        pt = Table(
            title=f"B3. cProfile, {label}: cumulative share of the coordinator's time "
            f"(x {cpu:.0f} µs measured without the profiler)"
        )
        for col in ("function", "calls/request", "share", "≈ µs/request"):
            pt.add_column(col, justify="right" if col != "function" else "left")
        for row in prof["profile_cumulative_share"][:18]:
            pt.add_row(row["function"], f"{row['calls_per_request']:g}", f"{row['share']:.1%}",
                       f"{row['share'] * cpu:.0f}")  # fmt: skip
        console.print(pt)


def print_targets(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if not results["targets"]:
        return
    targets = Table(title="targets")
    for col in ("target", "measured", "verdict"):
        targets.add_column(col)
    for t in results["targets"]:
        targets.add_row(t["target"], t["measured"], verdict(t["pass"]))
    console.print(targets)
    for note in results["notes"]:
        console.print(f"[dim]note:[/] {note}")


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, 1 short burst, 2 s throughput")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "handoff")
    p.add_argument("--cache", type=Path, default=None, help="package cache (default: CICADA_CACHE)")
    p.add_argument("--bursts", type=int, default=None)
    p.add_argument("--burst-requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=20.0, help="arrivals per second within a burst")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per request")
    p.add_argument("--keepalive", type=float, default=None, help="idle seconds before SIGTERM")
    p.add_argument("--gap", type=float, default=None, help="idle seconds between bursts")
    p.add_argument("--prime-gib", type=float, default=None, help="memory primed before bursts")
    p.add_argument("--cloud-threads", type=int, default=None, help="torch threads (cloud)")
    p.add_argument("--edge-capacity", type=int, default=2)
    p.add_argument(
        "--no-pin", action="store_true",
        help="part A: do not pin the cloud worker to its own core (default: the last core is the "
        "cloud's, the others everyone else's, emulating a cloud on another machine)",
    )  # fmt: skip
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--overhead-rounds", type=int, default=None)
    p.add_argument("--overhead-requests", type=int, default=None)
    p.add_argument("--overhead-warmup", type=int, default=200)
    p.add_argument("--clients", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--window", default="16,128", help="calls outstanding per client (comma list: a sweep)"
    )
    p.add_argument("--throughput-s", type=float, default=None)
    p.add_argument("--throughput-warmup", type=float, default=1.0)
    p.add_argument("--profile", action="store_true",
                   help="py-spy the coordinator during the 2-agent throughput run")  # fmt: skip
    p.add_argument("--skip-policies", action="store_true", help="part B only")
    p.add_argument("--skip-coordinator", action="store_true", help="part A only")
    p.add_argument(
        "--wait-quiet", type=float, default=None, metavar="LOAD",
        help="before each part, wait (<= 10 min) for the 1-min load average < LOAD",
    )  # fmt: skip
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "bursts": 1 if quick else 3,
        "burst_requests": 16 if quick else 120,
        "keepalive": 0.5 if quick else 2.0,
        "gap": 1.0 if quick else 4.0,
        "prime_gib": 0.0 if quick else 3.0,
        "overhead_rounds": 1 if quick else 3,
        "overhead_requests": 300 if quick else 2000,
        "throughput_s": 2.0 if quick else 6.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.overhead_warmup = min(args.overhead_warmup, 50)
        args.throughput_warmup = min(args.throughput_warmup, 0.5)
    args.windows = [int(w) for w in str(args.window).split(",") if w]
    if args.quick:
        args.windows = args.windows[-1:]
    if args.gap <= args.keepalive:
        p.error("--gap must be longer than --keepalive (every burst must meet a cold cloud)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=max(120, shutil.get_terminal_size((160, 40)).columns))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {POLICIES}")
    if args.cache is None:
        from cicada.demo import default_cache

        args.cache = default_cache()
    results: dict[str, Any] = {"machine": machine_info(), "loadavg_start": loadavg()}
    notes = [
        "Scale-to-zero is emulated by the benchmark: a fresh `cicada cloud` process per burst, "
        "started at the burst's first request and SIGTERMed after the burst is answered and an "
        "idle keep-alive; the coordinator-driven lifecycle is a later issue.",
        "cloud-only sends every request as priority 2 with a long deadline (so it waits for "
        "the cold start); attainment judges every policy on the class deadlines.",
        "Cloud 'ready' = the worker's '<model> resident' log line (every stage resident; the "
        "worker reports READY with its next heartbeat once the model is built, so the line can "
        "lead the coordinator's view by up to one heartbeat interval: the coordinator-metrics "
        "time, which lags by up to one, is reported beside it); page cache warm.",
        f"Memory primed ({args.prime_gib:g} GiB touched and freed) before each burst"
        if args.prime_gib > 0
        else "Memory NOT primed before bursts (quick mode).",
        "Everything shares this machine's "
        f"{os.cpu_count()} cores: coordinator, edge agent (1 ORT thread per request), cloud "
        "worker (torch threads), load generator.",
    ]
    with tempfile.TemporaryDirectory(prefix="cicada-handoff-") as tmp:
        work = Path(tmp)
        if not args.skip_policies:
            console.print("[bold]assets[/] …")
            assets = gpt2_assets(args.quick, args.cache, work, args.seq_len)
            trace = make_trace(args.bursts, args.burst_requests, args.rate, args.seed)
            results["config"] = {
                "quick": args.quick,
                "model": assets.description,
                "inputs": list(assets.inputs.shape),
                "bursts": args.bursts,
                "burst_requests": args.burst_requests,
                "rate": args.rate,
                "mix": dict(MIX),
                "classes": {k: {"priority": p, "deadline_s": d} for k, (p, d) in CLASSES.items()},
                "keepalive_s": args.keepalive,
                "gap_s": args.gap,
                "prime_gib": args.prime_gib,
                "edge_capacity": args.edge_capacity,
                "cloud_threads": args.cloud_threads,
                "cloud_only_deadline_s": CLOUD_ONLY_DEADLINE_S,
                "trace_description": f"{args.bursts} burst(s) x {args.burst_requests} requests, "
                f"Poisson {args.rate:g} req/s, {assets.description}",
            }
            cores = sorted(os.sched_getaffinity(0))
            pin = None
            if not args.no_pin and len(cores) >= 2:
                pin = (set(cores[:-1]), {cores[-1]})
            opts = PolicyOptions(
                bursts=args.bursts, keepalive_s=args.keepalive, gap_s=args.gap,
                heartbeat_s=0.5, edge_capacity=args.edge_capacity, prime_gib=args.prime_gib,
                cloud_threads=args.cloud_threads, pin=pin,
            )  # fmt: skip
            results["config"]["pinning"] = (
                None if pin is None
                else {"everything_else": sorted(pin[0]), "cloud_worker": sorted(pin[1])}
            )  # fmt: skip
            if pin is not None:
                notes.append(
                    f"Part A pins the cloud worker to core(s) {sorted(pin[1])} (torch threads = "
                    f"{args.cloud_threads or len(pin[1])}) and the coordinator, edge agent and "
                    f"load generator to {sorted(pin[0])}, so the emulated cloud does not take the "
                    "edge's CPU (on a real deployment it runs on another machine). Other "
                    "tenants of this shared machine are not pinned."
                )
            results["policies"] = {}
            for policy in policies:
                console.print(f"[bold]A[/] {policy} …")
                quiet = wait_quiet(args.wait_quiet, console)
                summary = asyncio.run(run_policy(policy, trace, assets, opts, work / policy))
                summary["quiet_wait"] = quiet
                if summary["cloud_compute_median_s"]:
                    summary["cloud_capacity_share"] = min(
                        1.0, 1.0 / (summary["cloud_compute_median_s"] * args.rate)
                    )
                    summary["large_share_bound"] = large_share_bound(summary)
                results["policies"][policy] = summary
                s = summary
                console.print(
                    f"  p50 {fmt_s(s['latency_ok']['p50_s'])}, "
                    f"p99 {fmt_s(s['latency_ok']['p99_s'])}, "
                    f"large model {fmt_pct(s['large_share'])}, statuses {s['statuses']}"
                )
            plot_policies(
                results["policies"], out / "handoff.png",
                f"Handoff on a bursty trace: {results['config']['trace_description']}",
            )  # fmt: skip
        if args.skip_coordinator:
            results["coordinator"] = None
        else:
            results["quiet_wait_part_b"] = wait_quiet(args.wait_quiet, console)
            results["coordinator"] = measure_coordinator(
                work / "coordinator", args.quick, args, console
            )
        for t in (results["coordinator"] or {}).get("throughput", []):
            profile_file = t.get("profile_file")
            if profile_file and (work / "coordinator" / profile_file).exists():
                shutil.copy(work / "coordinator" / profile_file, out / profile_file)
    if results["coordinator"] is not None:
        plot_overhead(results["coordinator"]["overhead"], out / "overhead.png")
    results["loadavg_end"] = loadavg()
    results["notes"] = notes
    if (
        "policies" in results
        and results["coordinator"] is not None
        and all(p in results["policies"] for p in POLICIES)
    ):
        results["targets"] = evaluate_targets(results)
    else:
        results["targets"] = []
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_report(results, console)
    console.print(f"wrote {out / 'results.json'}, {out / 'handoff.png'}, {out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
