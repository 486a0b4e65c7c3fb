"""`cicada demo`: the whole system on this machine, end to end.

Starts a coordinator, an edge agent and a *cold* cloud worker as local processes, sends a
burst of mixed-priority requests through the SDK while the cloud worker cold-starts, and
shows where each request went: at first everything is answered by the edge model in
milliseconds; as the cloud's stages become resident, quality-seeking and then normal requests
move to the large model, while latency-critical ones never wait for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cicada.demo import REFERENCE_MODELS, default_cache, ensure_package, example_input
from common.errors import CicadaError

# priority -> (share of the burst, deadline in seconds)
MIX = {0: (0.3, 1.0), 1: (0.5, 3.0), 2: (0.2, 8.0)}
PRIORITY_NAMES = {0: "critical", 1: "normal", 2: "quality"}
EDGE_SHRINK = {"gpt2-medium": {"n_layer": 2}, "gpt2-tiny": {"n_layer": 1}}


@dataclass
class Outcome:
    id: int
    priority: int
    deadline_s: float
    sent_at: float
    latency_s: float
    status: str
    served_by: str
    variant: str
    error: str = ""

    @property
    def met_deadline(self) -> bool:
        return self.status == "OK" and self.latency_s <= self.deadline_s


def ensure_edge_model(name: str, package: Path, cache: Path) -> Path:
    from edge.onnx_model import EdgeModel, EdgeModelError

    out = cache / "edge" / name
    try:
        EdgeModel.load(out)
        return out
    except EdgeModelError:
        pass
    from rich.console import Console

    from edge.export import export_edge

    with Console(stderr=True).status(f"exporting the int8 edge model of {name} (once)"):
        export_edge(package, out, shrink=EDGE_SHRINK.get(name), int8=True, force=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """The three roles as child processes, logs in a temporary directory."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port, self.metrics_port = _free_port(), _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cicada", *args],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def wait(self, predicate: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
        from edge.status import fetch_status

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise CicadaError(f"{name} exited: {self.tail(name)}")
            try:
                snapshot = fetch_status(self.metrics_url, timeout=1.0)
                if predicate(snapshot):
                    return snapshot
            except CicadaError:
                pass
            time.sleep(0.05)
        raise CicadaError(f"timed out waiting for {what}")

    def tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        for name in ("cloud", "edge", "coordinator"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _roles(snapshot: dict[str, Any], role: str) -> dict[str, int]:
    return {w["state"]: w["count"] for w in snapshot["workers"] if w["role"] == role}


async def _burst(
    address: str,
    inputs: Any,
    count: int,
    rate: float,
    seed: int,
    outcomes: list[Outcome],
    t0: float,
) -> None:
    from cicada import AsyncClient, ClientError, TransportError

    rng = random.Random(seed)
    priorities = rng.choices(list(MIX), weights=[m[0] for m in MIX.values()], k=count)

    async def one(i: int, priority: int, at: float, client: Any) -> None:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        deadline = MIX[priority][1]
        sent = time.monotonic()
        try:
            result = await client.invoke("demo", inputs, priority=priority, deadline=deadline)
            outcome = Outcome(
                i,
                priority,
                deadline,
                sent - t0,
                time.monotonic() - sent,
                "OK",
                result.served_by.get("role", "?"),
                result.served_by.get("variant", ""),
            )
        except (ClientError, TransportError) as exc:
            status = getattr(exc, "status", None)
            outcome = Outcome(
                i,
                priority,
                deadline,
                sent - t0,
                time.monotonic() - sent,
                getattr(status, "value", type(exc).__name__),
                "-",
                "",
                str(exc)[:80],
            )
        outcomes.append(outcome)

    at, schedule = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        schedule.append(at)
    async with AsyncClient(address, timeout=30.0) as client:
        await asyncio.gather(
            *(
                one(i, p, t, client)
                for i, (p, t) in enumerate(zip(priorities, schedule, strict=True))
            )
        )


def run_live_demo(model: str, cache: Path | None, as_json: bool, count: int, rate: float) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    if model not in REFERENCE_MODELS or not model.startswith("gpt2"):
        raise CicadaError(f"the cooperative demo runs gpt2-medium or gpt2-tiny, not {model!r}")
    console = Console(stderr=as_json)
    cache = cache or default_cache()
    package = ensure_package(model, cache)
    edge_dir = ensure_edge_model(model, package, cache)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cicada-demo-") as tmp:
        work = Path(tmp)
        inputs_path = example_input(model, work / "input.npy")
        import numpy as np

        inputs = np.load(inputs_path)
        stack = LocalStack(work)
        try:
            stack.start(
                "coordinator",
                "coordinator",
                "--bind",
                stack.address,
                "--metrics",
                f"127.0.0.1:{stack.metrics_port}",
                "--heartbeat",
                "0.25",
            )
            stack.wait(lambda s: True, "the coordinator")
            stack.start(
                "edge",
                "edge",
                "--model",
                "demo",
                "--onnx",
                str(edge_dir),
                "--coordinator",
                stack.address,
                "--name",
                "edge-1",
                "--heartbeat",
                "0.25",
            )
            stack.wait(lambda s: _roles(s, "edge"), "the edge agent to register")
            t0 = time.monotonic()
            stack.start(
                "cloud",
                "cloud",
                "--model",
                "demo",
                "--package",
                str(package),
                "--coordinator",
                stack.address,
                "--name",
                "cloud-1",
                "--heartbeat",
                "0.25",
            )
            cloud_ready_at: list[float] = []
            burst = threading.Thread(
                target=lambda: asyncio.run(
                    _burst(stack.address, inputs, count, rate, 0, outcomes, t0)
                ),
                daemon=True,
            )
            burst.start()
            progress = Progress(
                TextColumn("cloud worker {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} stages"),
            )
            task = progress.add_task("starting", total=None)

            def view() -> Group:
                table = Table(title=f"requests ({len(outcomes)}/{count} answered)")
                for col in ("#", "priority", "sent at", "served by", "latency", "status"):
                    table.add_column(col, justify="right")
                for o in sorted(outcomes, key=lambda o: o.sent_at)[-12:]:
                    table.add_row(
                        str(o.id),
                        PRIORITY_NAMES[o.priority],
                        f"{o.sent_at:.2f} s",
                        o.served_by,
                        f"{o.latency_s * 1000:.1f} ms",
                        o.status,
                    )
                return Group(progress, table)

            from edge.status import fetch_status

            with Live(view(), console=console, refresh_per_second=8, transient=as_json) as live:
                while burst.is_alive():
                    try:
                        snapshot = fetch_status(stack.metrics_url, timeout=1.0)
                    except CicadaError:
                        snapshot = None
                    if snapshot is not None:
                        cloud = snapshot["residency"].get("cloud-1")
                        states = _roles(snapshot, "cloud")
                        if cloud is not None:
                            state = next(iter(states), "?")
                            eta = cloud.get("eta_seconds", -1)
                            progress.update(
                                task,
                                completed=int(cloud["resident_stages"]),
                                total=int(cloud["total_stages"]) or None,
                                description=f"{state}"
                                + (f", eta {eta:.1f} s" if eta > 0 and state != "ready" else ""),
                            )
                            if state == "ready" and not cloud_ready_at:
                                cloud_ready_at.append(time.monotonic() - t0)
                    live.update(view())
                    time.sleep(0.12)
                burst.join()
                live.update(view())
        finally:
            stack.stop()
    _report(console, outcomes, cloud_ready_at[0] if cloud_ready_at else None, as_json, model)


def _report(
    console: Any, outcomes: list[Outcome], ready_at: float | None, as_json: bool, model: str
) -> None:
    from rich.table import Table

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    if as_json:
        print(
            json.dumps(
                {
                    "model": model,
                    "cloud_ready_at_s": ready_at,
                    "requests": [
                        {**asdict(o), "met_deadline": o.met_deadline}
                        for o in sorted(outcomes, key=lambda o: o.id)
                    ],
                },
                indent=1,
            )
        )
        return
    table = Table(
        title=f"burst of {len(outcomes)} requests while the cloud worker cold-started"
        + (f" (ready at {ready_at:.2f} s)" if ready_at else "")
    )
    for col in ("priority", "deadline", "edge", "cloud", "errors", "p50", "p99", "met deadline"):
        table.add_column(col, justify="right")
    for priority, (_, deadline) in MIX.items():
        group = [o for o in outcomes if o.priority == priority]
        ok = [o.latency_s for o in group if o.status == "OK"]
        table.add_row(
            PRIORITY_NAMES[priority],
            f"{deadline:.1f} s",
            str(sum(o.served_by == "edge" for o in group)),
            str(sum(o.served_by == "cloud" for o in group)),
            str(sum(o.status != "OK" for o in group)),
            f"{pct(ok, 0.5) * 1000:.1f} ms",
            f"{pct(ok, 0.99) * 1000:.1f} ms",
            f"{sum(o.met_deadline for o in group)}/{len(group)}",
        )
    console.print(table)
    console.print(
        "Critical requests never wait for the cold cloud; quality-seeking ones move to "
        "the large model as soon as its estimate fits their deadline."
    )
