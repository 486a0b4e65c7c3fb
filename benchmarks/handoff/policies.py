"""Part A: the routing policies (cloud-only, edge-only, cooperative) on the bursty trace."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.handoff.assets import Assets
from benchmarks.handoff.common import (
    CLASS_MARKERS,
    CLASSES,
    CLIENT_TIMEOUT_S,
    CLOUD_ONLY_DEADLINE_S,
    ROLE_COLORS,
    CpuWindow,
    RecordingTransport,
    fmt_pct,
    fmt_s,
    integrity,
    median,
    percentile,
    prime_memory,
)
from benchmarks.handoff.trace import Arrival
from benchmarks.machine import ROOT, loadavg
from cicada.client import AsyncClient, AsyncZmqTransport
from cicada.errors import ClientError, Timeout, TransportError, Unavailable
from cicada.testing import Stack


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
    standin: StandInProfile | None = None  # what-if: a stand-in cloud worker instead


@dataclass(frozen=True)
class StandInProfile:
    """The what-if's stand-in cloud worker (standin_cloud.py): its forward time and cold start."""

    service_s: float
    cold_start_s: float
    source: str


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
        _start_cloud(stack, assets, name, opts, extra)
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, opts.pin[1])
    try:
        _start_cloud(stack, assets, name, opts, extra)
    finally:
        os.sched_setaffinity(0, mine)


def _start_cloud(
    stack: Stack, assets: Assets, name: str, opts: PolicyOptions, extra: list[str]
) -> None:
    if opts.standin is None:
        stack.cloud(assets.model, assets.package, name, *extra)
        return
    # What-if: a stand-in worker process (not `python -m cicada`), registered with the Stack
    # so that kill() and the final stop() treat it as any other role.
    s = opts.standin
    log = open(stack.work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
    stack.procs[name] = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.handoff.standin_cloud", "--coordinator",
         stack.address, "--model", assets.model, "--name", name, "--service-s",
         str(s.service_s), "--cold-start-s", str(s.cold_start_s), "--vocab", str(assets.vocab),
         "--heartbeat", str(stack.heartbeat)],
        cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip


async def watch_ready(stack: Stack, origin: float, stop: asyncio.Event) -> float | None:
    """When the coordinator's metrics first show a ready cloud worker: polled once per
    heartbeat interval, the rate they are refreshed at, so this lags the coordinator's own view
    by up to two. No faster: each poll costs the coordinator and this process ~1.8 ms of CPU on
    the edge agent's core, and polling every 50 ms slowed the edge's forward there by 17 %
    (median of ~440 forwards, 4 Hz: 4 %), during the cloud's cold start and in the
    cooperative runs only — the slowdown the runs of 2026-12-03 blamed on the cold start."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        if await loop.run_in_executor(None, stack.workers, "cloud", "ready") > 0:
            return loop.time() - origin
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), stack.heartbeat)
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
