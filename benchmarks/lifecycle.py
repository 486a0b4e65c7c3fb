#!/usr/bin/env python3
"""Lifecycle benchmark: first cloud answer from zero per launcher, scale back to zero, and fixed
keep-alive vs lazy keep-warm on a bursty trace.

    python3 -m benchmarks.lifecycle                         # GPT-2-medium-like, 5 runs
    python3 -m benchmarks.lifecycle --model gpt2-tiny --runs 3 --out results/lifecycle-tiny
    python3 -m benchmarks.lifecycle --quick                 # tiny model, 1 run: a smoke test

Every role is a real process: `python -m cicada coordinator --config cicada.toml` (via
cicada.testing.Stack) starts, keeps and stops the cloud workers itself
(edge/coordinator/lifecycle.py); this script is only the load generator and the stopwatch.
There is no edge agent, so what is timed is the cloud's own first answer.

A. First cloud answer from zero. One coordinator per launcher, all started before measuring and
   idle at zero workers: `process` (a cold `python -m cicada cloud` per launch), `pool` (the warm
   pool, started and ready beforehand: the coordinator's CLI waits for its ping, which it answers
   only after `import torch`), and `ray` (cicada.cloud.ray_launcher.RayLauncher) when `ray` and that
   module import and a Ray coordinator comes up, else skipped with the reason printed (Ray runs
   locally on loopback with HOME and RAY_TMPDIR in a temporary directory; its actor lands on one
   of Ray's prestarted python workers, so it skips the interpreter start but not `import torch`).
   Each run sends one request (priority 2, 300 s deadline) to a coordinator with no worker and
   times send -> reply on the client; runs interleave the launchers (the order rotates each
   run). One untimed round per launcher first warms the page cache and Python's bytecode
   caches. Before every timed cold start memory is primed: this VM hands freed memory back to
   its host and touching it again costs ~2.4 s/GB, so ~3 GB are allocated with numpy, touched
   and freed in a throwaway process (--prime-gib; 0 turns it off and the JSON says so).
B. Back to zero. After each answer the worker idles past `keep_alive_s`; the coordinator logs
   "draining (scale down)" and SIGTERMs it. Timed: that log line -> the worker process gone
   (psutil, polled every 10 ms), and reply -> gone (keep-alive included).
C. Fixed keep-alive vs lazy keep-warm on a bursty trace with gaps longer than the keep-alive,
   through a `process`-launcher coordinator configured each way (same trace, fixed first, one
   worker at most): bursts of requests (default 6 bursts of 4, 1 s apart; priority 1, deadline
   2.5 s, so a request that would wait for a cold start past its deadline is refused at once
   rather than served late) separated by alternating gaps (8 s, 12 s) longer than the
   keep-alive (4 s).
   Counted: cold starts (worker processes started), requests answered by the cloud (OK),
   refused or timed out, latency, and worker-seconds (process lifetimes clipped to the window
   from the first request to the last reply + keep-alive + 5 s); a worker still up at the end
   of that window is reported (lazy keeps one for minutes after demand stops: its rate estimate
   has a 20 s half-life). Memory is primed once before each policy's trace, not before the
   launches inside it.

Also measured in the same run, to explain part A: `python -c pass` and `import torch` in a fresh
process (the two costs a warm pool pays in advance).

Writes <out>/results.json. The machine is shared and noisy: compare figures from the same run
(differences, ratios), never a lone absolute time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq
from rich.console import Console
from rich.table import Table

from benchmarks.machine import ROOT, loadavg
from benchmarks.machine import machine_info as base_machine_info
from cicada.common.protocol import Reply, Request, Status, decode, encode
from cicada.testing import Stack, process_cmdline, process_running

MODEL = "gpt2"
GiB = 2**30
TARGET_POOL_SAVING_S = 1.0
FIRST_ANSWER_DEADLINE_S = 300.0
# Ray on loopback (2.60 binds 127.0.0.1 only with this), HOME (its auth token) and RAY_TMPDIR
# (sessions, sockets) in a temporary directory; set for the Ray coordinator only.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": "", "RAY_TMPDIR": ""}
console = Console()


# -- helpers -----------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def prime_memory(gib: float) -> None:
    """Allocate, touch and free `gib` GiB in a throwaway process (see the module docstring)."""
    if gib > 0:
        code = f"import numpy as np; b = np.ones({int(gib * GiB) // 8}); b[::512] += 1; del b"
        subprocess.run([sys.executable, "-c", code], check=True)


def fresh_process_s(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.perf_counter() - start


def import_torch_s() -> float:
    code = (
        "import time, sys; t = time.perf_counter(); import torch; "
        "sys.stdout.write(str(time.perf_counter() - t))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout)


def machine_info() -> dict[str, Any]:
    info = base_machine_info()
    info["memory_gib"] = round(psutil.virtual_memory().total / GiB, 1)
    if (load := loadavg()) is not None:
        info["loadavg_start"] = load
    return info


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_times(text: str, needle: str) -> list[float]:
    """Wall-clock times (epoch s) of the coordinator log lines containing `needle`."""
    out = []
    for line in text.splitlines():
        m = LOG_TIME.match(line)
        if m and needle in line:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            out.append(t + int(m.group(2)) / 1000)
    return out


# -- a coordinator that runs the lifecycle -------------------------------------------------------


class Coordinator:
    """`cicada coordinator --config` on loopback, with its worker processes watched."""

    def __init__(self, work: Path, package: Path, launcher: str, heartbeat: float = 0.2,
                 **model: Any) -> None:  # fmt: skip
        self.launcher = launcher
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)
        lines = ["[coordinator]", f'launcher = "{launcher}"', 'log_dir = "logs"']
        if launcher == "pool":
            lines.append('pool_socket = "pool.sock"')
        lines += [f"[models.{MODEL}]", f'package = "{package}"']
        for key, value in model.items():
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}")
        (work / "cicada.toml").write_text("\n".join(lines) + "\n")
        self.stack = Stack(work, heartbeat=heartbeat)
        self.proc = self.stack.coordinator("--config", str(work / "cicada.toml"))
        self.ps = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + 180
        while "coordinator on" not in self.log():  # printed once the launcher is ready
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator ({launcher}) exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"coordinator ({launcher}) did not come up:\n{self.log()}")
            time.sleep(0.05)
        self.helpers = {k.pid for k in self.descendants()}  # the pool, Ray's processes

    @property
    def address(self) -> str:
        return self.stack.address

    def log(self) -> str:
        path = self.work / "coordinator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for k in kids:
            self.seen.setdefault(k.pid, k)
        return [k for k in kids if process_running(k)]

    def workers(self) -> list[psutil.Process]:
        if self.launcher == "ray":  # an actor occupies one of Ray's (possibly prestarted) workers
            return [
                k for k in self.descendants() if "CloudWorkerActor" in " ".join(process_cmdline(k))
            ]
        return [k for k in self.descendants() if k.pid not in self.helpers]

    def close(self) -> None:
        """SIGTERM: the coordinator closes its lifecycle and launcher; then kill leftovers."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        for p in self.seen.values():
            if process_running(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        self.stack.close()


class Caller:
    """A DEALER speaking the protocol: sends requests, collects exactly the replies."""

    def __init__(self, address: str) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.sent: dict[str, float] = {}
        self.replies: dict[str, list[tuple[float, Reply]]] = {}

    def send(self, x: np.ndarray, priority: int, deadline_s: float) -> str:
        rid = uuid.uuid4().hex[:12]
        self.sent[rid] = time.monotonic()
        self.sock.send_multipart(encode(Request(id=rid, model=MODEL, inputs=[x],
                                                priority=priority,
                                                timeout_ms=int(deadline_s * 1000))))  # fmt: skip
        return rid

    def pump(self, timeout: float) -> None:
        while self.sock.poll(int(max(0.0, timeout) * 1000)):
            m = decode(self.sock.recv_multipart())
            if isinstance(m, Reply):
                self.replies.setdefault(m.id, []).append((time.monotonic(), m))
            timeout = 0

    def pump_until(self, t: float) -> None:
        """Collect replies until monotonic time `t` (open loop: the next send is at `t`)."""
        while (left := t - time.monotonic()) > 0:
            self.pump(min(left, 0.05))

    def wait(self, rid: str, timeout: float) -> tuple[float, Reply]:
        deadline = time.monotonic() + timeout
        while rid not in self.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {rid} within {timeout} s")
            self.pump(0.05)
        return self.replies[rid][0]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# -- A and B: first answer from zero, back to zero -------------------------------------------------


@dataclass
class Run:
    launcher: str
    run: int
    first_answer_s: float
    queue_s: float | None
    compute_s: float | None
    worker: str
    worker_pid: int | None
    worker_parent_is_pool: bool | None
    drain_to_exit_s: float | None
    reply_to_zero_s: float | None
    timed: bool = True
    status: str = "OK"


def one_cold_answer(c: Coordinator, x: np.ndarray, run: int, prime_gib: float,
                    timed: bool = True) -> Run:  # fmt: skip
    if c.workers():
        raise RuntimeError(f"{c.launcher}: a worker is still up before run {run}")
    prime_memory(prime_gib)
    caller = Caller(c.address)
    try:
        time.sleep(0.2)  # the DEALER connects before the clock starts
        rid = caller.send(x, priority=2, deadline_s=FIRST_ANSWER_DEADLINE_S)
        pid, parent_is_pool = None, None
        deadline = time.monotonic() + FIRST_ANSWER_DEADLINE_S + 30
        watched: psutil.Process | None = None
        while rid not in caller.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{c.launcher}: no first answer")
            if watched is None:
                kids = c.workers()
                if kids:
                    watched = kids[0]
                    pid = watched.pid
                    if c.launcher == "pool":
                        with contextlib.suppress(psutil.Error):
                            parent_is_pool = watched.ppid() in c.helpers
            caller.pump(0.01)
        got, reply = caller.replies[rid][0]
    finally:
        caller.close()
    first = got - caller.sent[rid]
    if watched is None:  # it answered before we saw it: find it now
        kids = c.workers()
        watched = kids[0] if kids else None
        pid = watched.pid if watched else None
    # B: wait for it to be drained and gone.
    gone_wall = gone_mono = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if watched is None or not process_running(watched):
            gone_wall, gone_mono = time.time(), time.monotonic()
            break
        time.sleep(0.01)
    got_wall = time.time() - (time.monotonic() - got)
    drains = [t for t in log_times(c.log(), "draining (scale down)") if t >= got_wall - 0.05]
    drain_to_exit = (gone_wall - drains[0]) if (drains and gone_wall) else None
    while c.workers():  # back at zero before the next run
        if time.monotonic() > deadline:
            raise RuntimeError(f"{c.launcher}: workers did not stop: {c.workers()}")
        time.sleep(0.02)
    return Run(
        launcher=c.launcher, run=run, first_answer_s=first,
        queue_s=reply.timings.get("queue_s"), compute_s=reply.timings.get("compute_s"),
        worker=str(reply.served_by.get("worker", "")), worker_pid=pid,
        worker_parent_is_pool=parent_is_pool, drain_to_exit_s=drain_to_exit,
        reply_to_zero_s=(gone_mono - got) if gone_mono else None, timed=timed,
        status=reply.status.value,
    )  # fmt: skip


def ray_reason() -> str | None:
    """Why the Ray launcher cannot be measured here, or None if it can be tried."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not importable (install the [ray] extra)"
    try:
        if importlib.util.find_spec("cicada.cloud.ray_launcher") is None:
            return "cloud/ray_launcher.py is not there yet"
        from cicada.cloud.ray_launcher import RayLauncher  # noqa: F401
    except Exception as exc:  # someone else's module: any failure is a reason to skip
        return f"cicada.cloud.ray_launcher does not import: {type(exc).__name__}: {exc}"
    return None


def part_a(opts: argparse.Namespace, package: Path, x: np.ndarray, work: Path) -> dict[str, Any]:
    launchers = ["process", "pool"]
    skipped: dict[str, str] = {}
    reason = ray_reason()
    ray_tmp = Path(tempfile.mkdtemp(prefix="cicada-ray-")) if reason is None else None
    if reason is None:
        launchers.append("ray")
    else:
        skipped["ray"] = reason
        console.print(f"[yellow]ray actor: skipped: {reason}[/]")
    coords: dict[str, Coordinator] = {}
    runs: list[Run] = []
    try:
        for kind in launchers:
            saved = {k: os.environ.get(k) for k in RAY_ENV}
            if kind == "ray" and ray_tmp is not None:  # Ray on loopback, in a temp directory
                os.environ.update(RAY_ENV, HOME=str(ray_tmp), RAY_TMPDIR=str(ray_tmp))
            try:
                coords[kind] = Coordinator(work / f"a-{kind}", package, kind,
                                           keep_alive_s=opts.keep_alive, max_workers=1)  # fmt: skip
            except Exception as exc:
                if kind != "ray":
                    raise
                skipped["ray"] = f"the coordinator with launcher = 'ray' failed: {exc}"[:500]
                console.print(f"[yellow]ray actor: skipped: {skipped['ray']}[/]")
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        kinds = list(coords)
        for kind in list(kinds):  # untimed warm-up: page cache, bytecode caches
            try:
                runs.append(one_cold_answer(coords[kind], x, -1, opts.prime_gib, timed=False))
            except Exception as exc:
                if kind != "ray":
                    raise
                skipped["ray"] = f"first Ray answer failed: {exc}"[:500]
                kinds.remove(kind)
                coords.pop(kind).close()
        for i in range(opts.runs):
            order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
            for kind in order:
                r = one_cold_answer(coords[kind], x, i, opts.prime_gib)
                runs.append(r)
                console.print(f"  run {i + 1}/{opts.runs} {kind:8s} first cloud answer "
                              f"{fmt_s(r.first_answer_s)}, drain->exit "
                              f"{fmt_s(r.drain_to_exit_s)}", highlight=False)  # fmt: skip
    finally:
        for c in coords.values():
            c.close()
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    summary: dict[str, Any] = {}
    for kind in coords:
        timed = [r for r in runs if r.launcher == kind and r.timed]
        summary[kind] = {
            "n": len(timed),
            "first_answer_s": median([r.first_answer_s for r in timed]),
            "first_answer_min_s": min((r.first_answer_s for r in timed), default=None),
            "first_answer_max_s": max((r.first_answer_s for r in timed), default=None),
            "queue_s": median([r.queue_s for r in timed if r.queue_s is not None]),
            "compute_s": median([r.compute_s for r in timed if r.compute_s is not None]),
            "drain_to_exit_s": median(
                [r.drain_to_exit_s for r in timed if r.drain_to_exit_s is not None]
            ),
            "reply_to_zero_s": median(
                [r.reply_to_zero_s for r in timed if r.reply_to_zero_s is not None]
            ),
            "all_ok": all(r.status == "OK" for r in timed),
        }
    return {"runs": [r.__dict__ for r in runs], "summary": summary, "skipped": skipped,
            "keep_alive_s": opts.keep_alive}  # fmt: skip


# -- C: fixed keep-alive vs lazy keep-warm -------------------------------------------------------


def make_trace(bursts: int, size: int, spacing: float, gaps: list[float]) -> list[float]:
    times, t = [], 0.0
    for b in range(bursts):
        times += [t + i * spacing for i in range(size)]
        t += (size - 1) * spacing + gaps[b % len(gaps)]
    return times


class Watcher(threading.Thread):
    """Polls the coordinator's worker processes: when each appeared and when it was gone."""

    def __init__(self, c: Coordinator) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.life: dict[int, list[float]] = {}  # pid -> [start (monotonic), end or nan]
        self.stop_event = threading.Event()

    def run(self) -> None:
        offset = time.monotonic() - time.time()
        while not self.stop_event.is_set():
            alive = set()
            for p in self.c.workers():
                alive.add(p.pid)
                if p.pid not in self.life:
                    with contextlib.suppress(psutil.Error):
                        self.life[p.pid] = [p.create_time() + offset, float("nan")]
            now = time.monotonic()
            for pid, span in self.life.items():
                if pid not in alive and span[1] != span[1]:
                    span[1] = now
            time.sleep(0.05)


def run_policy(policy: str, opts: argparse.Namespace, package: Path, x: np.ndarray,
               work: Path, trace: list[float]) -> dict[str, Any]:  # fmt: skip
    prime_memory(opts.prime_gib)
    c = Coordinator(work / f"c-{policy}", package, "process", keep_warm=policy,
                    keep_alive_s=opts.trace_keep_alive, max_workers=1,
                    expected_start_s=opts.expected_start)  # fmt: skip
    watcher = Watcher(c)
    watcher.start()
    caller = Caller(c.address)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        for at in trace:
            caller.pump_until(t0 + at)
            caller.send(x, priority=1, deadline_s=opts.trace_deadline)
        deadline = time.monotonic() + opts.trace_deadline + 10
        while len(caller.replies) < len(caller.sent) and time.monotonic() < deadline:
            caller.pump(0.05)
        last_reply = max((r[0][0] for r in caller.replies.values()), default=time.monotonic())
        window_end = last_reply + opts.trace_keep_alive + 5.0
        while time.monotonic() < window_end:
            caller.pump(0.1)
        warm_at_end = len(c.workers())
    finally:
        watcher.stop_event.set()
        watcher.join(5)
        caller.close()
        c.close()
    worker_s = sum(
        max(0.0, min(end if end == end else window_end, window_end) - max(start, t0))
        for start, end in watcher.life.values()
    )
    outcomes = Counter()
    latencies, answered = [], 0
    per_request = []
    for rid, sent in caller.sent.items():
        got = caller.replies.get(rid, [])
        outcomes["replies_" + str(len(got))] += 1
        if not got:
            per_request.append({"t": sent - t0, "status": "none"})
            continue
        at, reply = got[0]
        outcomes[reply.status.value] += 1
        role = reply.served_by.get("role", "")
        if reply.status is Status.OK and role == "cloud":
            answered += 1
            latencies.append(at - sent)
        per_request.append({"t": round(sent - t0, 3), "status": reply.status.value,
                            "latency_s": round(at - sent, 4), "role": role,
                            "worker": reply.served_by.get("worker", "")})  # fmt: skip
    return {
        "policy": policy,
        "requests": len(caller.sent),
        "cold_starts": len(watcher.life),
        "answered_by_cloud": answered,
        "outcomes": dict(outcomes),
        "exactly_once": outcomes.get("replies_1", 0) == len(caller.sent),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies, default=None),
        "worker_seconds": worker_s,
        "window_s": window_end - t0,
        "warm_at_window_end": warm_at_end,
        "per_request": per_request,
    }


def part_c(opts: argparse.Namespace, package: Path, x: np.ndarray, work: Path) -> dict[str, Any]:
    trace = make_trace(opts.bursts, opts.burst_size, opts.burst_spacing, opts.gaps)
    results = {}
    for policy in ("fixed", "lazy"):
        console.print(f"  trace with keep_warm = {policy!r}: {len(trace)} requests over "
                      f"{trace[-1]:.0f} s", highlight=False)  # fmt: skip
        results[policy] = run_policy(policy, opts, package, x, work, trace)
    return {
        "trace": {"bursts": opts.bursts, "burst_size": opts.burst_size,
                  "spacing_s": opts.burst_spacing, "gaps_s": opts.gaps,
                  "priority": 1, "deadline_s": opts.trace_deadline,
                  "keep_alive_s": opts.trace_keep_alive, "times_s": trace},
        "policies": results,
    }  # fmt: skip


# -- report --------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    a = results["first_answer"]
    s = a["summary"]
    title = (
        f"First cloud answer from zero ({results['model']}, median of {results['runs']}, "
        f"memory primed {results['prime_gib']} GiB before each)"
    )
    table = Table(title=title)
    for col in ("launcher", "first answer", "min", "max", "queue (wait for worker)",
                "compute", "drain -> exit", "reply -> zero"):  # fmt: skip
        table.add_column(col, justify="right" if col != "launcher" else "left")
    for kind, row in s.items():
        table.add_row(kind, fmt_s(row["first_answer_s"]), fmt_s(row["first_answer_min_s"]),
                      fmt_s(row["first_answer_max_s"]), fmt_s(row["queue_s"]),
                      fmt_s(row["compute_s"]), fmt_s(row["drain_to_exit_s"]),
                      fmt_s(row["reply_to_zero_s"]))  # fmt: skip
    for kind, why in a["skipped"].items():
        table.add_row(kind, f"skipped: {why}", "", "", "", "", "", "")
    console.print(table)
    ref = results["reference"]
    console.print(f"same run: python -c pass {fmt_s(ref['python_start_s'])}, import torch "
                  f"{fmt_s(ref['import_torch_s'])} (what a warm pool pays in advance); "
                  f"keep-alive {a['keep_alive_s']} s", highlight=False)  # fmt: skip

    c = results["keep_warm"]
    if "policies" in c:
        report_trace(c)
    for t in results["targets"]:
        colour = {"PASS": "green", "FAIL": "red"}.get(t["verdict"], "yellow")
        console.print(f"[{colour}]{t['verdict']}[/] {t['target']}: {t['measured']}",
                      highlight=False)  # fmt: skip


def report_trace(c: dict[str, Any]) -> None:
    table = Table(title=f"Fixed keep-alive vs lazy keep-warm (keep-alive "
                        f"{c['trace']['keep_alive_s']} s, {c['trace']['bursts']} bursts of "
                        f"{c['trace']['burst_size']}, gaps {c['trace']['gaps_s']} s, priority 1, "
                        f"deadline {c['trace']['deadline_s']} s)")  # fmt: skip
    for col in ("policy", "requests", "cold starts", "answered by cloud", "refused/timed out",
                "p50", "p95", "max", "worker-seconds", "warm at end"):  # fmt: skip
        table.add_column(col, justify="right" if col != "policy" else "left")
    for policy, row in c["policies"].items():
        refused = row["requests"] - row["answered_by_cloud"]
        table.add_row(policy, str(row["requests"]), str(row["cold_starts"]),
                      str(row["answered_by_cloud"]), str(refused), fmt_s(row["latency_p50_s"]),
                      fmt_s(row["latency_p95_s"]), fmt_s(row["latency_max_s"]),
                      f"{row['worker_seconds']:.1f} / {row['window_s']:.0f}",
                      str(row["warm_at_window_end"]))  # fmt: skip
    console.print(table)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["first_answer"]["summary"]
    process, pool = s.get("process", {}), s.get("pool", {})
    p_first, w_first = process.get("first_answer_s"), pool.get("first_answer_s")
    saving = p_first - w_first if p_first is not None and w_first is not None else None
    like = "GPT-2-medium-like" if results["model"] == "gpt2-medium" else results["model"]
    verdict = "n/a" if saving is None else ("PASS" if saving >= TARGET_POOL_SAVING_S else "FAIL")
    if results["model"] != "gpt2-medium" and verdict != "n/a":
        verdict = f"{verdict} (not the target model)"
    out = [{
        "target": f"warm pool cuts >= {TARGET_POOL_SAVING_S:.0f} s from the cold-process first "
                  f"cloud answer ({like})",
        "measured": (f"process {fmt_s(p_first)} - pool {fmt_s(w_first)} = {fmt_s(saving)} "
                     "(medians, same run)") if saving is not None else "not measured",
        "saving_s": saving,
        "verdict": verdict,
    }]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-medium", choices=["gpt2-medium", "gpt2-tiny"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "lifecycle")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 run, short trace")
    ap.add_argument("--cache", type=Path, default=None, help="package cache (CICADA_CACHE)")
    ap.add_argument(
        "--prime-gib",
        type=float,
        default=3.0,
        help="memory to touch and free before each cold start (0: off)",
    )
    ap.add_argument("--keep-alive", type=float, default=1.0, help="part A/B keep-alive, s")
    ap.add_argument("--trace-keep-alive", type=float, default=4.0)
    ap.add_argument("--trace-deadline", type=float, default=2.5)
    ap.add_argument("--expected-start", type=float, default=3.0)
    ap.add_argument("--bursts", type=int, default=6)
    ap.add_argument("--burst-size", type=int, default=4)
    ap.add_argument("--burst-spacing", type=float, default=1.0)
    ap.add_argument(
        "--gaps",
        type=lambda s: [float(g) for g in s.split(",")],
        default=[8.0, 12.0],
        help="idle gaps between bursts, alternating (s, comma-separated)",
    )
    ap.add_argument("--skip-trace", action="store_true", help="parts A and B only")
    ap.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the coordinator and worker logs (kept anyway when a run fails)",
    )
    opts = ap.parse_args(argv)  # fmt: skip
    if opts.quick:
        opts.model, opts.runs = "gpt2-tiny", 1
        opts.bursts, opts.burst_size, opts.gaps = 3, 3, [3.0]
        opts.trace_keep_alive, opts.prime_gib = 1.0, min(opts.prime_gib, 0.5)
    from cicada.demos.cold_start import default_cache, ensure_package, example_input

    cache = opts.cache or default_cache()
    t = time.monotonic()
    package = ensure_package(opts.model, cache)
    console.print(f"package {package} ready in {time.monotonic() - t:.1f} s", highlight=False)
    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cicada-lifecycle-"))
    x = np.load(example_input(opts.model, work / "x.npy"))

    load_start = machine_info().get("loadavg_start")
    reference = {
        "python_start_s": median([fresh_process_s("pass") for _ in range(5)]),
        "import_torch_s": median([import_torch_s() for _ in range(3)]),
    }
    console.rule("A/B: first cloud answer from zero, and back to zero")
    first = part_a(opts, package, x, work)
    keep_warm: dict[str, Any] = {"skipped": "--skip-trace"}
    if not opts.skip_trace:
        console.rule("C: fixed keep-alive vs lazy keep-warm")
        keep_warm = part_c(opts, package, x, work)
    results: dict[str, Any] = {
        "model": opts.model,
        "package": str(package),
        "runs": opts.runs,
        "quick": opts.quick,
        "prime_gib": opts.prime_gib,
        "memory_primed": opts.prime_gib > 0,
        "reference": reference,
        "first_answer": first,
        "keep_warm": keep_warm,
        "machine": {**machine_info(), "loadavg_start": load_start},
        "work": str(work) if opts.keep_work else None,
    }
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["targets"] = targets(results)
    (opts.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report(results)
    console.print(f"wrote {opts.out / 'results.json'}", highlight=False)
    if opts.keep_work:
        console.print(f"logs in {work}", highlight=False)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
