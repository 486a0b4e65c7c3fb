"""Constants and small helpers of the handoff benchmark: statistics, CPU accounting, the
reply-counting transport and the exactly-once check."""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from benchmarks.machine import ROOT, loadavg
from benchmarks.machine import machine_info as base_machine_info

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
    info = base_machine_info(("pyzmq", "msgpack", "numpy", "onnxruntime", "torch"))
    info["libzmq"] = zmq.zmq_version()
    # The code measured: these files change while other work goes on; name the exact bytes.
    info["source_sha256"] = {
        name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:16]
        for name in ("edge/coordinator/broker.py", "edge/coordinator/registry.py",
                     "edge/coordinator/scheduler.py", "edge/coordinator/relay.py",
                     "edge/coordinator/policy.py", "common/worker.py", "common/protocol.py",
                     "cicada/client.py", "cloud/service.py")
        if (ROOT / name).exists()
    }  # fmt: skip
    return info


def prime_memory(gib: float) -> None:
    """Allocate, touch and free `gib` GiB in a throwaway process: this VM hands freed memory
    back to its host and touching it again is ~15x slower, which a cold start would pay. Off
    by default (--prime-gib): the hand-back of what the cloud does not reuse comes ~2 s after
    the free, and stalled both vCPUs for 0.1-0.5 s in the middle of the burst (BENCHMARKS.md,
    Handoff, "What slows the edge")."""
    if gib > 0:
        code = f"import numpy as np; block = np.ones({int(gib * GiB) // 8}); del block"
        subprocess.run([sys.executable, "-c", code], check=True)


BURNERS = ("edge", "cloud", "free")


@contextlib.contextmanager
def burner(where: str | None, pin: tuple[set[int], set[int]] | None) -> Any:
    """Another process using one core all along (a Python busy loop), for part A's runs under
    load: pinned to the edge's cores ("edge": those of the coordinator, the edge agent and the
    load generator), to the emulated cloud's ("cloud"), or left to the scheduler ("free").
    Yields what it did, for the results; None: no burner."""
    if where is None:
        yield None
        return
    if where not in BURNERS:
        raise ValueError(f"burner {where!r}: one of {', '.join(BURNERS)}")
    if where != "free" and pin is None:
        raise ValueError(f"a burner on the {where}'s cores needs part A's pinning (not --no-pin)")
    cores = None if where == "free" or pin is None else pin[0] if where == "edge" else pin[1]
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        if cores is not None:
            os.sched_setaffinity(proc.pid, cores)
        yield {"where": where, "cores": None if cores is None else sorted(cores), "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()


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
