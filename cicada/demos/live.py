"""`cicada demo`: the whole system on this machine, end to end.

Starts a coordinator, an edge agent and a *cold* cloud worker as local processes, sends a
burst of mixed-priority requests through the SDK while the cloud worker cold-starts, and
shows where each request went: at first everything is answered by the edge model in
milliseconds; as the cloud's stages become resident, quality-seeking and then normal requests
move to the large model, while latency-critical ones never wait for it.

`--model minilm` runs the pretrained pair instead: all-MiniLM-L6-v2 in fp32 through the
cloud pipeline, the same model as an int8 ONNX export on the edge. Requests carry real
sentences as text (each role tokenizes with the tokenizer.json beside its model) and the
report puts the cosine similarity between the edge's and the cloud's embedding of each
sentence next to the latencies: the quality the edge trades for speed.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cicada.common.errors import CicadaError
from cicada.demos.cold_start import (
    REFERENCE_MODELS,
    default_cache,
    ensure_package,
    example_input,
)
from cicada.testing.stack import Stack

# priority -> (share of the burst, deadline in seconds)
MIX = {0: (0.3, 1.0), 1: (0.5, 3.0), 2: (0.2, 8.0)}
PRIORITY_NAMES = {0: "critical", 1: "normal", 2: "quality"}
EDGE_SHRINK = {"gpt2-medium": {"n_layer": 2}, "gpt2-tiny": {"n_layer": 1}}
# (requests, rate) when not given: the MiniLM burst lasts longer than the cloud's cold start
# (torch and transformers imports, ~4 s here), so that both sides answer some of it.
BURST_DEFAULTS = {"minilm": (36, 4.0)}
DEFAULT_BURST = (60, 12.0)
HOLD_FOR_CLOUD_S = 120.0  # the most the burst's held request waits for the cloud to be ready
MINILM_SENTENCES = (
    "A man is playing a guitar on stage.",
    "The new movie is awesome, I loved every minute of it.",
    "How do I reset my password?",
    "Stock markets fell sharply on Monday after the announcement.",
    "The cat sleeps on the warm windowsill.",
    "Serverless functions scale to zero when nobody calls them.",
    "She is cooking pasta for her friends tonight.",
    "Quantum computers use qubits instead of bits.",
    "The train to Berlin leaves at seven in the morning.",
    "Regular exercise improves both mood and sleep.",
    "This restaurant serves the best sushi in town.",
    "Edge devices answer in milliseconds while the cloud model warms up.",
)
SIMILARITY_NOTE = (
    "cosine(edge, cloud): each sentence embedded after the run by the edge's int8 ONNX "
    "model and by the cloud's fp32 pipeline, in this process, from the very files the agent "
    "and the worker served (same tokenizer, batch of one, as each request ran); every "
    "served embedding is checked against the one of its side (max |diff| below)."
)


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
    # The latest it can have been dispatched to the worker that answered (seconds since the
    # burst's time zero): received minus the coordinator's worker_s. None: not dispatched.
    dispatched_by_s: float | None = None

    @property
    def met_deadline(self) -> bool:
        return self.status == "OK" and self.latency_s <= self.deadline_s


def ensure_edge_model(name: str, package: Path, cache: Path) -> Path:
    from cicada.edge.onnx_model import EdgeModel, EdgeModelError

    out = cache / "edge" / name
    try:
        EdgeModel.load(out)
        return out
    except EdgeModelError:
        pass
    from rich.console import Console

    from cicada.cloud.export_edge import export_edge

    with Console(stderr=True).status(f"exporting the int8 edge model of {name} (once)"):
        export_edge(package, out, shrink=EDGE_SHRINK.get(name), int8=True, force=True)
    return out


def _roles(snapshot: dict[str, Any], role: str) -> dict[str, int]:
    return {w["state"]: w["count"] for w in snapshot["workers"] if w["role"] == role}


RequestFor = Callable[[int], dict[str, Any]]  # request index -> Client.invoke keyword arguments


async def _burst(
    address: str,
    request_for: RequestFor,
    count: int,
    rate: float,
    seed: int,
    outcomes: list[Outcome],
    t0: float,
    outputs: dict[int, list[Any]],
    cloud_ready: threading.Event | None = None,
) -> None:
    from cicada import AsyncClient, CallError

    rng = random.Random(seed)
    priorities = rng.choices(list(MIX), weights=[m[0] for m in MIX.values()], k=count)
    # The burst's last request that may use the cloud waits for it to be ready (a bounded
    # wait): however long the cold start takes, both sides answer some of the burst.
    held = max((i for i, p in enumerate(priorities) if p >= 1), default=None)

    async def one(i: int, priority: int, at: float, client: Any) -> None:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        if i == held and cloud_ready is not None:
            await asyncio.to_thread(cloud_ready.wait, HOLD_FOR_CLOUD_S)
        deadline = MIX[priority][1]
        sent = time.monotonic()
        try:
            result = await client.invoke(
                "demo", priority=priority, deadline=deadline, **request_for(i)
            )
            received = time.monotonic()
            outputs[i] = result.outputs
            outcome = Outcome(
                i,
                priority,
                deadline,
                sent - t0,
                time.monotonic() - sent,
                "OK",
                result.served_by.get("role", "?"),
                result.served_by.get("variant", ""),
                dispatched_by_s=received - result.timings.get("worker_s", 0.0) - t0,
            )
        except CallError as exc:
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


def _start_roles(stack: Stack, package: Path, edge_dir: Path) -> float:
    """Coordinator, then the edge agent, then a cold cloud worker; returns when the cloud
    worker was launched (the burst's time zero)."""
    stack.coordinator()
    stack.edge("demo", edge_dir, "edge-1")
    stack.wait_for(lambda s: _roles(s, "edge"), "the edge agent to register", poll_timeout=1.0)
    t0 = time.monotonic()
    stack.cloud("demo", package, "cloud-1")
    return t0


def _serve_burst(
    stack: Stack,
    t0: float,
    request_for: RequestFor,
    count: int,
    rate: float,
    console: Any,
    as_json: bool,
    label: Callable[[int], str] | None = None,
) -> tuple[list[Outcome], dict[int, list[Any]], float | None, float]:
    """Send the burst while showing the cloud's residency and the latest answers live.
    Returns the outcomes, each OK request's outputs by id, when the cloud was seen ready, and
    the last time it was seen not ready (it became ready after that: 0.0 is its launch)."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from cicada.edge.coordinator.status import fetch_status

    outcomes: list[Outcome] = []
    outputs: dict[int, list[Any]] = {}
    cloud_ready_at: list[float] = []
    cloud_cold_until = 0.0
    ready = threading.Event()
    burst = threading.Thread(
        target=lambda: asyncio.run(
            _burst(stack.address, request_for, count, rate, 0, outcomes, t0, outputs, ready)
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

    width = _sentence_width(console, 70)

    def view() -> Group:
        table = Table(title=f"requests ({len(outcomes)}/{count} answered)")
        columns = ("#", "priority", "sent at", "served by", "latency", "status")
        for col in columns[:2] + (("sentence",) if label else ()) + columns[2:]:
            _add_column(table, col, width)
        for o in sorted(outcomes, key=lambda o: o.sent_at)[-12:]:
            sentence = (_short(label(o.id), width),) if label else ()
            table.add_row(str(o.id), PRIORITY_NAMES[o.priority], *sentence, f"{o.sent_at:.2f} s",
                          o.served_by, f"{o.latency_s * 1000:.1f} ms", o.status)  # fmt: skip
        return Group(progress, table)

    with Live(view(), console=console, refresh_per_second=8, transient=as_json) as live:
        while burst.is_alive():
            asked = time.monotonic() - t0
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
                        ready.set()
                if not ready.is_set():
                    cloud_cold_until = asked  # not ready when asked: it became ready later
            live.update(view())
            time.sleep(0.12)
        burst.join()
        live.update(view())
    return outcomes, outputs, cloud_ready_at[0] if cloud_ready_at else None, cloud_cold_until


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _sentence_width(console: Any, others: int) -> int:
    """Room for the sentence column beside `others` characters of other columns and borders:
    one line per request, the sentence cut short on a narrow terminal."""
    return max(12, min(60, int(console.width) - others))


def _add_column(table: Any, name: str, width: int) -> None:
    if name == "sentence":
        table.add_column(name, justify="left", no_wrap=True, max_width=width)
    else:
        table.add_column(name, justify="right", no_wrap=True)


def run_live_demo(
    model: str,
    cache: Path | None,
    as_json: bool,
    count: int | None = None,
    rate: float | None = None,
    texts: Sequence[str] = (),
) -> None:
    from rich.console import Console

    if model not in REFERENCE_MODELS or not (model.startswith("gpt2") or model == "minilm"):
        raise CicadaError(
            f"the cooperative demo runs gpt2-medium, gpt2-tiny or minilm, not {model!r}"
        )
    if texts and model != "minilm":
        raise CicadaError("--text goes with --model minilm (a model that takes text)")
    default_count, default_rate = BURST_DEFAULTS.get(model, DEFAULT_BURST)
    count = default_count if count is None else count
    rate = default_rate if rate is None else rate
    console = Console(stderr=as_json)
    cache = cache or default_cache()
    package = ensure_package(model, cache)
    edge_dir = ensure_edge_model(model, package, cache)
    sentences = [*MINILM_SENTENCES, *texts]
    with tempfile.TemporaryDirectory(prefix="cicada-demo-") as tmp:
        work = Path(tmp)
        # The roles run in the caller's directory; any of them exiting ends the demo.
        stack = Stack(work, heartbeat=0.25, cwd=None, fail_fast=True)
        request_for, label = _requests(model, work, sentences)
        try:
            t0 = _start_roles(stack, package, edge_dir)
            outcomes, outputs, ready_at, cold_until = _serve_burst(
                stack, t0, request_for, count, rate, console, as_json, label
            )
        finally:
            stack.stop()
    if model != "minilm":
        _report(console, outcomes, ready_at, as_json, model, cold_until)
        return
    with console.status("embedding every sentence on both sides, for the comparison"):
        edge_ref, cloud_ref = _references(package, edge_dir, sentences)
    _report_minilm(console, outcomes, outputs, ready_at, as_json, sentences, edge_ref, cloud_ref,
                   cold_until)  # fmt: skip


def _requests(
    model: str, work: Path, sentences: Sequence[str]
) -> tuple[RequestFor, Callable[[int], str] | None]:
    """What request i sends: a sentence as text (minilm, in turn), or the example tensor."""
    if model == "minilm":

        def sentence(i: int) -> str:
            return sentences[i % len(sentences)]

        return (lambda i: {"text": [sentence(i)]}), sentence
    import numpy as np

    inputs = np.load(example_input(model, work / "input.npy"))
    return (lambda i: {"inputs": inputs}), None


def _references(package: Path, edge_dir: Path, sentences: Sequence[str]) -> tuple[Any, Any]:
    """Each sentence's embedding by the edge model and by the cloud model, (n, 384) each: the
    agent's ONNX file with its settings (int8, one thread), and the worker's pipeline on the
    same package, each with the tokenizer.json of its own directory."""
    import numpy as np
    import torch

    from cicada.cloud.pipeline import ColdStart
    from cicada.common.text import load_tokenizer
    from cicada.edge.onnx_model import EdgeModel

    edge, cold = EdgeModel.load(edge_dir), ColdStart(package)
    edge_tok, cloud_tok = load_tokenizer(edge_dir), load_tokenizer(package)
    if edge_tok is None or cloud_tok is None:
        raise CicadaError(f"{edge_dir} and {package} must each hold a tokenizer.json")
    edge_vecs, cloud_vecs = [], []
    for sentence in sentences:  # one at a time, as the requests ran
        edge_vecs.append(edge.run([edge_tok.encode([sentence])])[0][0])
        ids = torch.from_numpy(cloud_tok.encode([sentence]))
        cloud_vecs.append(cold.forward(ids)[0].numpy())
    return np.stack(edge_vecs), np.stack(cloud_vecs)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _report_minilm(
    console: Any,
    outcomes: list[Outcome],
    outputs: dict[int, list[Any]],
    ready_at: float | None,
    as_json: bool,
    sentences: Sequence[str],
    edge_ref: Any,
    cloud_ref: Any,
    cold_until: float = 0.0,
) -> None:
    import numpy as np
    from rich.table import Table

    norms = np.linalg.norm(edge_ref, axis=1) * np.linalg.norm(cloud_ref, axis=1)
    cosine = (edge_ref * cloud_ref).sum(axis=1) / norms  # (n,)
    rows: list[dict[str, Any]] = []
    for o in sorted(outcomes, key=lambda o: o.id):
        k = o.id % len(sentences)
        row = {**asdict(o), "met_deadline": o.met_deadline, "sentence": k,
               "text": sentences[k], "cosine_edge_cloud": float(cosine[k])}  # fmt: skip
        if o.id in outputs and o.served_by in ("edge", "cloud"):
            served = np.asarray(outputs[o.id][0])[0]  # (384,)
            reference = (edge_ref if o.served_by == "edge" else cloud_ref)[k]
            row["embedding_dim"] = int(served.shape[-1])
            row["embedding_norm"] = float(np.linalg.norm(served))
            row["max_abs_diff_vs_side_reference"] = float(np.abs(served - reference).max())
        rows.append(row)
    by_side = {side: [r for r in rows if r["served_by"] == side] for side in ("edge", "cloud")}
    latency: dict[str, float | None] = {
        f"{side}_p50_ms": _pct([r["latency_s"] for r in group], 0.5) * 1000
        for side, group in by_side.items()
    }
    # The cloud's p50 above includes waiting for its cold start; this one does not.
    warm = [r["latency_s"] for r in by_side["cloud"] if ready_at and r["sent_at"] >= ready_at]
    latency["cloud_ready_p50_ms"] = _pct(warm, 0.5) * 1000 if warm else None
    check = {
        f"{side}_max_abs_diff": max(
            (r["max_abs_diff_vs_side_reference"] for r in group), default=None
        )
        for side, group in by_side.items()
    }
    summary = {
        "how": SIMILARITY_NOTE,
        "mean": float(cosine.mean()),
        "min": float(cosine.min()),
        **check,
    }
    if as_json:
        doc = {
            "model": "minilm",
            "cloud_ready_at_s": ready_at,
            "cloud_cold_until_s": cold_until,
            "sentences": [
                {"text": t, "cosine_edge_cloud": float(c)}
                for t, c in zip(sentences, cosine, strict=True)
            ],
            "similarity": summary,
            "latency": latency,
            "requests": rows,
        }
        print(json.dumps(doc, indent=1))
        return
    table = Table(
        title=f"{len(rows)} sentences embedded while the cloud worker cold-started"
        + (f" (ready at {ready_at:.2f} s)" if ready_at else "")
    )
    width = _sentence_width(console, 58)
    for col in ("#", "priority", "sentence", "served by", "latency", "cosine"):
        _add_column(table, col, width)
    for r in rows:
        table.add_row(
            str(r["id"]),
            PRIORITY_NAMES[r["priority"]],
            _short(r["text"], width),
            r["served_by"] if r["status"] == "OK" else r["status"],
            f"{r['latency_s'] * 1000:.1f} ms",
            f"{r['cosine_edge_cloud']:.4f}",
        )
    console.print(table)
    console.print(
        f"edge (int8 ONNX): {len(by_side['edge'])} answers, p50 {latency['edge_p50_ms']:.1f} ms; "
        f"cloud (fp32 pipeline): {len(by_side['cloud'])} answers, p50 "
        f"{latency['cloud_p50_ms']:.1f} ms"
        + (f" ({latency['cloud_ready_p50_ms']:.1f} ms once ready)" if warm else "")
        + f". cos(edge, cloud) over {len(sentences)} sentences: "
        f"mean {summary['mean']:.4f}, min {summary['min']:.4f}."
    )
    diffs = ", ".join(f"{side} {value:.2g}" for side in ("edge", "cloud")
                      if (value := check[f"{side}_max_abs_diff"]) is not None)  # fmt: skip
    console.print(SIMILARITY_NOTE.replace("(max |diff| below)", f"(max |diff|: {diffs or '-'})"))


def _report(
    console: Any,
    outcomes: list[Outcome],
    ready_at: float | None,
    as_json: bool,
    model: str,
    cold_until: float = 0.0,
) -> None:
    from rich.table import Table

    if as_json:
        print(
            json.dumps(
                {
                    "model": model,
                    "cloud_ready_at_s": ready_at,
                    "cloud_cold_until_s": cold_until,
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
            f"{_pct(ok, 0.5) * 1000:.1f} ms",
            f"{_pct(ok, 0.99) * 1000:.1f} ms",
            f"{sum(o.met_deadline for o in group)}/{len(group)}",
        )
    console.print(table)
    console.print(
        "Critical requests never wait for the cold cloud; quality-seeking ones move to "
        "the large model as soon as its estimate fits their deadline."
    )
