#!/usr/bin/env python3
"""Generation benchmark: time to first token and tokens/s, edge-only vs cooperative across a
cold start (and cloud-only, which waits for it).

    python3 -m benchmarks.generation             # GPT-2-medium-like cloud, 256 tokens, 3 runs
    python3 -m benchmarks.generation --quick     # tiny model, 1 run: a smoke test

Every role is a real process (cicada.testing.Stack): `cicada coordinator`, `cicada edge` (the int8
ONNX edge variant `cicada export-edge` makes from the package), `cicada cloud`. Per run and
scenario, a fresh coordinator; one streamed generation (`Client.stream`, greedy, `--tokens`
new tokens after a `--prompt`-token prompt, priority 1, no deadline):

* edge-only: an edge agent registered beforehand, no cloud worker.
* cooperative: the edge agent registered beforehand; the cloud worker process is started at
  the moment the request is sent (scale from zero), and the coordinator moves the generation
  to it mid-stream once its weights are resident (docs/PROTOCOL.md section 12).
* cloud-only: no edge agent; the cloud worker is started, and the request sent as soon as the
  worker has registered (cold; priority 2, so it waits for the cold start). Timed from the
  worker's launch, like the others.

Timed on the client: request sent -> first token (TTFT), -> last token (total); tokens/s =
tokens / total; and for cooperative, the token index where the cloud took over. Weights are
random (a seeded init), so what is measured is speed, not text quality. Runs interleave the
scenarios; medians are printed with the ratios measured in the same run. The page cache is
warm (one untimed cloud start first). Writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.machine import ROOT, machine_info
from cicada.client import Client
from cicada.testing import Stack

MODEL = "gpt2"
SCENARIOS = ("edge-only", "cooperative", "cloud-only")
console = Console()


def run_once(scenario: str, work: Path, package: Path, edge_dir: Path, prompt: np.ndarray,
             tokens: int, edge_token_interval: float = 0.0) -> dict[str, Any]:  # fmt: skip
    work.mkdir(parents=True)
    with Stack(work, heartbeat=0.2) as stack:
        stack.coordinator()
        if scenario != "cloud-only":
            stack.edge(MODEL, edge_dir, "edge", "--token-interval", str(edge_token_interval))
            stack.wait_workers("edge")
        with Client(stack.address, timeout=600) as client:
            start = time.perf_counter()
            if scenario != "edge-only":
                stack.cloud(MODEL, package, "cloud")
            if scenario == "cloud-only":
                # Nobody serves the model until the worker registers (while still cold, before
                # it imports torch): a request sent earlier would be answered UNAVAILABLE.
                stack.wait_workers("cloud", timeout=60)
            stream = client.stream(MODEL, prompt, max_new_tokens=tokens,
                                   priority=2 if scenario == "cloud-only" else 1)  # fmt: skip
            stamps: list[float] = []
            roles: list[str] = []
            for piece in stream:
                stamps.append(time.perf_counter() - start)
                roles.append(piece.role)
        assert stream.result is not None and len(stamps) == tokens
    cloud_from = roles.index("cloud") if "cloud" in roles else None
    return {
        "ttft_s": stamps[0],
        "total_s": stamps[-1],
        "tokens_per_s": tokens / stamps[-1],
        "cloud_tokens": roles.count("cloud"),
        "handoff_at_token": cloud_from,
        "handoff_at_s": stamps[cloud_from] if cloud_from is not None else None,
        # Steady speed of each side: seconds per token between consecutive tokens it made.
        "edge_s_per_token": _per_token(stamps, roles, "edge"),
        "cloud_s_per_token": _per_token(stamps, roles, "cloud"),
    }


def _per_token(stamps: list[float], roles: list[str], role: str) -> float | None:
    gaps = [b - a for a, b, r0, r1 in zip(stamps, stamps[1:], roles, roles[1:], strict=False)
            if r0 == r1 == role]  # fmt: skip
    return statistics.median(gaps) if gaps else None


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-medium", choices=["gpt2-medium", "gpt2-tiny"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument(
        "--edge-token-interval",
        type=float,
        default=0.0,
        help="seconds at least between the edge's tokens (a slower edge device)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 1 run, 32 tokens from an edge paced at 0.75 s a token",
    )
    ap.add_argument("--cache", type=Path, default=None, help="package cache (CICADA_CACHE)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "generation")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.model, opts.runs, opts.tokens = "gpt2-tiny", 1, 32
        # The tiny edge would finish before the cloud worker has imported torch: paced, it
        # cannot finish in under 24 s, so the cooperative run hands off unless the cloud takes
        # that long to start (a bound on waiting, not a race).
        opts.edge_token_interval = 0.75
    from cicada.cloud.export_edge import export_edge
    from cicada.demos.cold_start import REFERENCE_MODELS, default_cache, ensure_package

    cache = opts.cache or default_cache()
    package = ensure_package(opts.model, cache)
    edge_dir = cache / "edge" / opts.model
    if not (edge_dir / "edge_model.json").exists():
        export_edge(package, edge_dir, int8=True, force=True)
    vocab = int(REFERENCE_MODELS[opts.model][1].get("vocab_size", 50257))
    prompt = np.random.default_rng(0).integers(0, vocab, (1, opts.prompt), dtype=np.int64)

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="cicada-gen-") as tmp:
        work = Path(tmp)
        console.print("warming the page cache (one untimed cloud-only run)")
        run_once("cloud-only", work / "warm", package, edge_dir, prompt, 2)
        for i in range(opts.runs):
            order = SCENARIOS[i % 3 :] + SCENARIOS[: i % 3]  # rotate: no scenario always first
            for scenario in order:
                r = run_once(scenario, work / f"{scenario}-{i}", package, edge_dir, prompt,
                             opts.tokens, opts.edge_token_interval)  # fmt: skip
                results[scenario].append(r)
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                console.print(f"run {i} {scenario}: {json.dumps(shown)}")

    table = Table(title=f"{opts.model}: {opts.tokens} new tokens, prompt {opts.prompt}, "
                        f"median of {opts.runs}")  # fmt: skip
    for col in ("scenario", "TTFT", "total", "tokens/s", "cloud tokens", "handoff at",
                "edge s/token", "cloud s/token"):  # fmt: skip
        table.add_column(col, justify="right")
    summary: dict[str, dict[str, float | None]] = {}
    for scenario, runs in results.items():
        row = {k: med(runs, k) for k in runs[0]}
        summary[scenario] = row

        def f(key: str, fmt: str = "{:.3f}", row: dict[str, float | None] = row) -> str:
            v = row[key]
            return "—" if v is None else fmt.format(v)

        table.add_row(scenario, f("ttft_s", "{:.3f} s"), f("total_s", "{:.2f} s"),
                      f("tokens_per_s", "{:.1f}"), f("cloud_tokens", "{:.0f}"),
                      f("handoff_at_token", "{:.0f}"), f("edge_s_per_token"),
                      f("cloud_s_per_token"))  # fmt: skip
    console.print(table)
    coop, edge, cloud = summary["cooperative"], summary["edge-only"], summary["cloud-only"]
    ratios = {
        "ttft_cooperative_over_edge_only": _ratio(coop["ttft_s"], edge["ttft_s"]),
        "ttft_cloud_only_over_cooperative": _ratio(cloud["ttft_s"], coop["ttft_s"]),
        "total_cooperative_over_edge_only": _ratio(coop["total_s"], edge["total_s"]),
        "total_cloud_only_over_cooperative": _ratio(cloud["total_s"], coop["total_s"]),
        "cloud_share_cooperative": (coop["cloud_tokens"] or 0) / opts.tokens,
    }
    for k, v in ratios.items():
        console.print(f"{k}: {v:.2f}" if v is not None else f"{k}: —")
    opts.out.mkdir(parents=True, exist_ok=True)
    out = opts.out / "results.json"
    out.write_text(json.dumps({
        "model": opts.model, "tokens": opts.tokens, "prompt": opts.prompt, "runs": results,
        "edge_token_interval_s": opts.edge_token_interval,
        "median": summary, "ratios": ratios,
        "machine": {**machine_info(), "cpus": os.cpu_count()},
    }, indent=2))  # fmt: skip
    console.print(f"wrote {out}")
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


if __name__ == "__main__":
    sys.exit(main())
