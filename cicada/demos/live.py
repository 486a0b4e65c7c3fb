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
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cicada.common.errors import CicadaError
from cicada.demos.cold_start import (
    REFERENCE_MODELS,
    default_cache,
    ensure_package,
    example_input,
)
from cicada.demos.mission import (
    Frame,
    cache_summary,
    critical_on_time,
    frame_from,
    frames_json,
    launching_frame,
    quality_after_ready,
)
from cicada.demos.trace import MIX, PACE, PRIORITY_NAMES, Outcome, Pacer, RequestFor, burst
from cicada.testing.stack import Stack

EDGE_SHRINK = {"gpt2-medium": {"n_layer": 2}, "gpt2-tiny": {"n_layer": 1}}
# (requests, rate) when not given: the MiniLM burst lasts longer than the cloud's cold start
# (torch and transformers imports, ~4 s here), so that both sides answer some of it.
BURST_DEFAULTS = {"minilm": (36, 4.0)}
DEFAULT_BURST = (60, 12.0)
LAST_ANSWERS = 8  # rows of the live table's latest answers, below the per-priority summary
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


@contextlib.contextmanager
def step(console: Any, what: str, setup: dict[str, float], key: str) -> Iterator[None]:
    """A spinner with the elapsed time while `what` runs (no step of the demo is a blank
    screen), its duration kept in `setup[key]`."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    start = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn(what), TimeElapsedColumn(), console=console,
                  transient=True) as bar:  # fmt: skip
        bar.add_task(what, total=None)
        yield
    setup[key] = time.monotonic() - start
    console.print(f"[green]✓[/] {what} ({setup[key]:.1f} s)")


def ensure_edge_model(name: str, package: Path, cache: Path, console: Any = None,
                      setup: dict[str, float] | None = None) -> Path:  # fmt: skip
    """The int8 edge model of `name` in the cache, exported once (its time in `setup`)."""
    from rich.console import Console

    from cicada.edge.onnx_model import EdgeModel, EdgeModelError

    out = cache / "edge" / name
    try:
        EdgeModel.load(out)
        return out
    except EdgeModelError:
        pass
    from cicada.cloud.export_edge import export_edge

    what = f"exporting the int8 edge model of {name} to {out} (once; cached)"
    with step(console or Console(stderr=True), what, {} if setup is None else setup, "export_s"):
        export_edge(package, out, shrink=EDGE_SHRINK.get(name), int8=True, force=True)
    return out


def cached_input(name: str, cache: Path, console: Any = None) -> Any:
    """The model's example input, kept in the cache: building it imports torch (seconds on a
    busy machine), which the demo's own process otherwise never needs. A file that does not
    load as a plain array (no pickle) is made again."""
    import numpy as np
    from rich.console import Console

    path = cache / "inputs" / f"{name}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True)
    what = f"making {name}'s example input (once; cached)"
    with step(console or Console(stderr=True), what, {}, "input_s"):
        return np.load(example_input(name, path), allow_pickle=False)


def _roles(snapshot: dict[str, Any], role: str) -> dict[str, int]:
    return {w["state"]: w["count"] for w in snapshot["workers"] if w["role"] == role}


def _start_roles(stack: Stack, package: Path, edge_dir: Path, console: Any,
                 setup: dict[str, float]) -> float:  # fmt: skip
    """Coordinator, then the edge agent, then a cold cloud worker; returns when the cloud
    worker was launched (the burst's time zero)."""
    with step(console, "starting the coordinator", setup, "coordinator_s"):
        stack.coordinator()
    with step(console, "starting the edge agent (ONNX Runtime, int8)", setup, "edge_s"):
        stack.edge("demo", edge_dir, "edge-1")
        stack.wait_for(lambda s: _roles(s, "edge"), "the edge agent to register",
                       poll_timeout=1.0)  # fmt: skip
    t0 = time.monotonic()
    stack.cloud("demo", package, "cloud-1")
    return t0


class Live:
    """What the demo saw, shared between the burst's thread and the display loop."""

    def __init__(self, t0: float, count: int, total_stages: int, total_bytes: int) -> None:
        self.t0 = t0  # the cloud worker's launch
        self.count = count
        self.outcomes: list[Outcome] = []
        self.outputs: dict[int, list[Any]] = {}
        self.frames: list[Frame] = [launching_frame(0.0, total_stages, total_bytes)]
        self.current = self.frames[0]  # the latest, shown (`frames` keeps the changes)
        self.total_stages = total_stages
        self.ready = threading.Event()
        self.ready_at: float | None = None
        self.cold_until = 0.0  # the last time the cloud was seen not ready
        self.pacer = Pacer()

    def observe(self, snapshot: dict[str, Any] | None, asked: float) -> None:
        """One status snapshot, asked for at `asked` (seconds since the launch)."""
        frame = None if snapshot is None else frame_from(snapshot, "cloud-1", asked,
                                                        self.total_stages)  # fmt: skip
        if frame is None:
            last = self.frames[-1]
            if last.phase == "launching":
                self.frames[-1] = launching_frame(asked, last.total_stages, last.total_bytes)
                self.current = self.frames[-1]
        else:
            self.current = frame
            # Kept when something besides the clocks changed.
            if replace(frame, t=0.0, phase_s=0.0) != replace(self.frames[-1], t=0.0, phase_s=0.0):
                self.frames.append(frame)
            if frame.state == "ready" and not self.ready.is_set():
                self.ready_at = time.monotonic() - self.t0
                self.ready.set()
        if not self.ready.is_set():
            self.cold_until = asked  # not ready when asked: it became ready later


def _view(live: Live, label: Callable[[int], str] | None, width: int) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    frame = live.current
    total = frame.total_stages or None
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        f"cloud worker, launched {frame.t:.1f} s ago",
        ProgressBar(total=total, completed=frame.resident_stages, width=30),
        f"{frame.resident_stages}/{frame.total_stages} stages resident",
    )
    bar.add_row("", "", frame.describe())
    if live.pacer.forward_s is not None:
        forward = live.pacer.forward_s
        bar.add_row("", "", f"cloud forward ~{forward:.2f} s (measured): quality-seeking "
                    f"requests paced one per {PACE * forward:.2f} s")  # fmt: skip
    outcomes = list(live.outcomes)
    per_route = Table(title=f"requests ({len(outcomes)}/{live.count} answered)")
    for col in ("priority", "edge", "cloud", "errors", "met deadline"):
        per_route.add_column(col, justify="right")
    for priority in MIX:
        group = [o for o in outcomes if o.priority == priority]
        per_route.add_row(
            PRIORITY_NAMES[priority],
            str(sum(o.served_by == "edge" for o in group)),
            str(sum(o.served_by == "cloud" for o in group)),
            str(sum(o.status != "OK" for o in group)),
            f"{sum(o.met_deadline for o in group)}/{len(group)}",
        )
    latest = Table(title=f"latest {LAST_ANSWERS} answers")
    columns = ("#", "priority", "sent at", "served by", "latency", "status")
    for col in columns[:2] + (("sentence",) if label else ()) + columns[2:]:
        _add_column(latest, col, width)
    for o in sorted(outcomes, key=lambda o: o.sent_at + o.latency_s)[-LAST_ANSWERS:]:
        sentence = (_short(label(o.id), width),) if label else ()
        latest.add_row(str(o.id), PRIORITY_NAMES[o.priority], *sentence, f"{o.sent_at:.2f} s",
                       o.served_by, f"{o.latency_s * 1000:.1f} ms", o.status)  # fmt: skip
    return Group(bar, per_route, latest)


def _serve_burst(
    stack: Stack,
    live: Live,
    request_for: RequestFor,
    rate: float,
    console: Any,
    as_json: bool,
    label: Callable[[int], str] | None = None,
) -> None:
    """Send the burst while showing the cloud's start-up and where the answers went, live."""
    from rich.live import Live as RichLive

    from cicada.edge.coordinator.status import fetch_status

    t0 = live.t0
    sender = threading.Thread(
        target=lambda: asyncio.run(
            burst(
                stack.address,
                request_for,
                live.count,
                rate,
                0,
                live.outcomes,
                t0,
                live.outputs,
                live.ready,
                live.pacer,
            )
        ),
        daemon=True,
    )
    sender.start()
    width = _sentence_width(console, 70)
    with RichLive(_view(live, label, width), console=console, refresh_per_second=8,
                  transient=as_json) as screen:  # fmt: skip
        while sender.is_alive():
            asked = time.monotonic() - t0
            try:
                snapshot: dict[str, Any] | None = fetch_status(stack.metrics_url, timeout=1.0)
            except CicadaError:
                snapshot = None
            live.observe(snapshot, asked)
            screen.update(_view(live, label, width))
            time.sleep(0.12)
        sender.join()
        screen.update(_view(live, label, width))


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

    from cicada.common.package import Manifest

    began = time.monotonic()
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
    setup: dict[str, float] = {}
    package = ensure_package(model, cache)
    setup["package_s"] = time.monotonic() - began
    edge_dir = ensure_edge_model(model, package, cache, console, setup)
    manifest = Manifest.load(package)
    sentences = [*MINILM_SENTENCES, *texts]
    with tempfile.TemporaryDirectory(prefix="cicada-demo-") as tmp:
        # The roles run in the caller's directory; any of them exiting ends the demo.
        stack = Stack(Path(tmp), heartbeat=0.25, cwd=None, fail_fast=True)
        request_for, label = _requests(model, cache, sentences, console)
        try:
            t0 = _start_roles(stack, package, edge_dir, console, setup)
            setup["first_request_after_s"] = time.monotonic() - began
            live = Live(t0, count, len(manifest.stages), manifest.total_bytes)
            _serve_burst(stack, live, request_for, rate, console, as_json, label)
        finally:
            stack.stop()
    mission = _mission(live, setup, cache)
    if model != "minilm":
        _report(console, live, as_json, model, mission)
        return
    with console.status("embedding every sentence on both sides, for the comparison"):
        edge_ref, cloud_ref = _references(package, edge_dir, sentences)
    _report_minilm(console, live, as_json, sentences, edge_ref, cloud_ref, mission)


def _requests(
    model: str, cache: Path, sentences: Sequence[str], console: Any = None
) -> tuple[RequestFor, Callable[[int], str] | None]:
    """What request i sends: a sentence as text (minilm, in turn), or the example tensor."""
    if model == "minilm":

        def sentence(i: int) -> str:
            return sentences[i % len(sentences)]

        return (lambda i: {"text": [sentence(i)]}), sentence
    inputs = cached_input(model, cache, console)
    return (lambda i: {"inputs": inputs}), None


def _mission(live: Live, setup: dict[str, float], cache: Path) -> dict[str, Any]:
    """What the summary states, for the text and --json alike."""
    return {
        "cloud_ready_at_s": live.ready_at,
        "cloud_cold_until_s": live.cold_until,
        "quality_after_ready": quality_after_ready(live.outcomes),
        "critical": critical_on_time(live.outcomes),
        "pacing": {
            "cloud_forward_s": live.pacer.forward_s,
            "pace": PACE,
            "quality_gaps_s": live.pacer.gaps,
        },
        "residency": frames_json(live.frames),
        "setup": setup,
        "cache": cache_summary(cache),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _mission_lines(console: Any, mission: dict[str, Any]) -> None:
    """The closing lines: what the run showed, in its own numbers."""
    ready_at = mission["cloud_ready_at_s"]
    q = mission["quality_after_ready"]
    crit = mission["critical"]
    console.print(
        f"latency-critical: {crit['edge_in_time']} of {crit['sent']} answered by the edge inside "
        "their deadline (they never wait for a cold cloud)."
    )
    if ready_at is None:
        console.print("the cloud worker did not become ready during the burst.")
    elif q["sent"]:
        console.print(
            f"quality-seeking requests sent after the cloud was ready (at {ready_at:.2f} s): "
            f"[bold]{q['cloud']} of {q['sent']}[/] served by the large model in the cloud "
            f"({q['share']:.0%}); {q['edge']} by the edge."
        )
    forward = mission["pacing"]["cloud_forward_s"]
    if forward is not None:
        console.print(
            f"pacing: one forward of the cloud worker took ~{forward:.2f} s here (measured from "
            f"its replies): one CPU worker runs one at a time, so the quality-seeking requests "
            f"after ready were sent one per {PACE * forward:.2f} s, what it can carry."
        )
    cache = mission["cache"]
    size = cache["bytes"]
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    console.print(f"cache: {cache['path']} ({shown}: packages, edge models, example inputs; "
                  "delete it to start over)")  # fmt: skip


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
    live: Live,
    as_json: bool,
    sentences: Sequence[str],
    edge_ref: Any,
    cloud_ref: Any,
    mission: dict[str, Any],
) -> None:
    import numpy as np
    from rich.table import Table

    outcomes, outputs, ready_at = live.outcomes, live.outputs, live.ready_at

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
            **mission,
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
    console.print()
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
    _mission_lines(console, mission)


def _report(console: Any, live: Live, as_json: bool, model: str, mission: dict[str, Any]) -> None:
    from rich.table import Table

    outcomes, ready_at = live.outcomes, live.ready_at
    if as_json:
        requests = [{**asdict(o), "met_deadline": o.met_deadline}
                    for o in sorted(outcomes, key=lambda o: o.id)]  # fmt: skip
        print(json.dumps({"model": model, **mission, "requests": requests}, indent=1))
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
    console.print()
    console.print(table)
    _mission_lines(console, mission)
