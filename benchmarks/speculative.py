#!/usr/bin/env python3
"""Exact generations from a cold cloud, with edge drafts after the takeover (issue 13).

    python3 -m benchmarks.speculative           # GPT-2-medium-like, full-depth int8 draft
    python3 -m benchmarks.speculative --quick   # tiny GPT-2 (4 layers): about a minute

Real processes (cicada.testing.Stack) on loopback; each run starts from a cold cloud worker
(a fresh process: import torch, build, load) and makes one generation of `--tokens` tokens
(default 256) three ways, each with its own fresh stack, in the same run:

* **exact** (`exact=True`): the request starts on the edge agent (the cloud is started as it
  is sent); the edge's tokens stream provisional; the ready cloud takes over, verifies them,
  and decodes with the edge's drafts (docs/PROTOCOL.md section 12, "Drafting after the
  takeover"). Timed on the client: the first (provisional) token, the first exact token (the
  first cloud token after the rewind), and the result; the tokens/s after the takeover (the
  cloud's tokens over the time from the rewind to the last token), the acceptance (drafts
  accepted / drafts verified, from the cloud's RESULT timings) and the tokens rewound.
* **cloud-only**: no edge; start the cloud, wait until it is ready, then decode (exact; it
  runs on the cloud alone). Timed from the cloud's start: the result; the cloud's own decode
  rate (tokens over the time from its first token to its last): `cloud_alone_tokens_per_s`.
* **handoff**: today's non-exact generation (edge first, the cloud continues; nothing verified).
* **cloud-only, auto** (only where the cloud has one thread and `--row-invariant` is not auto):
  cloud-only again on a worker with `--row-invariant auto`, which decodes alone on MKL, faster
  on one thread than the row-invariant kernel the drafted decode needs: the fastest decode
  alone this machine has, which `speedup_vs_fastest_alone` and
  `exact_sooner_than_fastest_cloud_only_s` compare against.

Every cloud worker runs with `--row-invariant always` by default (`cloud/few_rows.py`: each row
of a verify forward computed as the one-token step computes it, no replays; from 2 threads it is
what auto does anyway).

The cloud model is cloud/models/gpt2.py built eagerly (seeded, nothing downloaded) with its
blocks' matrices scaled (benchmarks/draft.py says why), packed, and exported with
`cicada export-edge --int8 --full-depth` (the draft); both cached under `--cache` (default a
temporary directory). `exact_matches` counts the exact runs whose result equals the cloud
model's eager greedy decode, computed here. The edge and the cloud share this machine's cores
(a real edge device would not); memory is not primed (DESIGN.md's trap): each run's cold start
pays for it alike. The last line of output is one JSON object; <out>/results.json has it with
every run, the machine and the load average.
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

from benchmarks.machine import ROOT, loadavg, machine_info
from cicada.common.defaults import ROW_INVARIANCE

MODEL = "gpt2"
FACTORY = "cicada.cloud.models.gpt2:build"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 (4 layers), one run")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=None, help="cold starts per mode (default 2)")
    p.add_argument("--scale", type=float, default=None, help="blocks' matrices x (2; quick 4)")
    p.add_argument("--token-interval", type=float, default=None,
                   help="pace the edge's provisional tokens (s; default 0, quick 0.05: the tiny "
                        "edge would finish before the cold start ends)")  # fmt: skip
    p.add_argument(
        "--no-pin", action="store_true",
        help="do not pin the cloud worker to its own core (default, on 2+ cores: the last core "
             "is the cloud's, with 1 torch thread, the others everyone else's, in every mode: "
             "the edge device and the cloud machine are emulated on one host)")  # fmt: skip
    p.add_argument(
        "--row-invariant", choices=ROW_INVARIANCE, default="always",
        help="the cloud worker's --row-invariant, in every mode (pinned, it has one thread: "
             "auto then decodes on MKL, always on the row-invariant kernel, which its drafted "
             "decode needs to skip replays; a cloud-only run on auto is added then)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=None, help="model cache (default: a temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "speculative")
    p.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep each run's coordinator, edge and cloud logs here (default: dropped)",
    )
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of exact, cloud_only, handoff, cloud_only_auto "
                        "(default: all that apply)")  # fmt: skip
    args = p.parse_args(argv)
    unknown = set((args.modes or "exact").split(",")) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}")
    if args.runs is None:
        args.runs = 1 if args.quick else 2
    if args.scale is None:
        args.scale = 4.0 if args.quick else 2.0
    if args.token_interval is None:
        args.token_interval = 0.05 if args.quick else 0.0
    return args


MODES = ("exact", "cloud_only", "handoff", "cloud_only_auto")


def modes_for(args: argparse.Namespace, pin: tuple[set[int], set[int]] | None) -> list[str]:
    """The modes to run: --modes, else all, cloud_only_auto only where it differs (one thread)."""
    if args.modes:
        return args.modes.split(",")
    differs = (pin is not None or (os.cpu_count() or 1) < 2) and args.row_invariant != "auto"
    return [m for m in MODES if m != "cloud_only_auto" or differs]


def model_config(quick: bool) -> dict[str, Any]:
    from cicada.cloud.models import gpt2

    if quick:
        return {**gpt2.tiny_config(), "n_layer": 4, "block_size": 512, "seed": 3}
    return {}  # GPT-2-medium (gpt2.GPTConfig defaults)


def build_assets(args: argparse.Namespace, work: Path) -> tuple[Any, Path, Path]:
    """(the cloud model in this process, its package, the full-depth int8 draft)."""
    from benchmarks.draft import cloud_model
    from cicada.cloud.export_edge import export_edge
    from cicada.cloud.packing import pack

    config = model_config(args.quick)
    model = cloud_model(config, args.scale).eval()
    tag = f"{'tiny4' if args.quick else 'medium'}-x{args.scale:g}"
    package, edge = work / f"{tag}-pkg", work / f"{tag}-edge"
    if not (package / "manifest.json").exists():
        pack(FACTORY, package, config=config, model=model, force=True)
    if not (edge / "edge_model.json").exists():
        export_edge(package, edge, int8=True, full_depth=True, force=True)
    return model, package, edge


def reference(model: Any, prompt: np.ndarray, n: int) -> list[int]:
    from cicada.cloud.generate import decoder_for
    from cicada.common.generation import GenerationRequest, generate

    return generate(decoder_for(model), GenerationRequest(prompt, n), lambda t: None).tokens


def pinning(args: argparse.Namespace) -> tuple[set[int], set[int]] | None:
    """(cores for the client, coordinator and edge agent; the cloud worker's core), or None."""
    cores = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cores) < 2:
        return None
    return set(cores[:-1]), {cores[-1]}


def start_cloud(
    stack: Any, package: Path, pin: tuple[set[int], set[int]] | None, rows: str = "auto"
) -> None:
    """A cold cloud worker; on its own core with one torch thread when pinned (the affinity is
    set on this thread only, which the spawned child inherits)."""
    extra = ("--row-invariant", rows)
    if pin is None:
        stack.cloud(MODEL, package, "cloud", *extra)
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, pin[1])
    try:
        stack.cloud(MODEL, package, "cloud", "--threads", "1", *extra)
    finally:
        os.sched_setaffinity(0, mine)


def run_edge_first(
    stack: Any,
    package: Path,
    prompt: np.ndarray,
    n: int,
    exact: bool,
    pin: tuple[set[int], set[int]] | None = None,
    rows: str = "auto",
) -> dict[str, Any]:
    """The generation starts on the edge while the cloud cold-starts (started with it)."""
    from cicada.client import Client

    with Client(stack.address, timeout=600) as client:
        start = time.perf_counter()
        start_cloud(stack, package, pin, rows)
        first = exact_first = rewind_at = None
        last = start
        rewind = 0
        cloud_tokens = 0
        with client.stream(MODEL, prompt[None], max_new_tokens=n, exact=exact) as stream:
            for piece in stream:
                now = time.perf_counter() - start
                if piece.rewind is not None:
                    rewind_at, rewind = now, piece.rewind
                    continue
                first = now if first is None else first
                if piece.role == "cloud":
                    cloud_tokens += 1
                    if exact_first is None:
                        exact_first = now
                        rewind_at = now if rewind_at is None else rewind_at
                last = now
        result = stream.result
        assert result is not None
        done = time.perf_counter() - start
    info = result.generation
    timings = result.timings
    after = (last - rewind_at) if rewind_at is not None else None
    return {
        "tokens": result.output.tolist(),
        "edge_ttft_s": first,
        "exact_ttft_s": exact_first,
        "result_s": done,
        "taken_over_at": rewind,
        "cloud_tokens": cloud_tokens,
        "tokens_per_s_after_takeover": cloud_tokens / after if after else None,
        "exact": None if info is None else info.exact,
        "rewound": None if info is None else info.rewound,
        "drafted": timings.get("worker_drafted"),
        "accepted": timings.get("worker_accepted"),
        "alone_rounds": timings.get("worker_alone"),
        "waited": timings.get("worker_waited"),
        "rounds": timings.get("worker_rounds"),
        "guard_fired": timings.get("worker_guard_fired"),
        "replayed": timings.get("worker_replayed"),
        "rows_exact": timings.get("worker_rows_exact"),
    }


def run_cloud_only(
    stack: Any,
    package: Path,
    prompt: np.ndarray,
    n: int,
    pin: tuple[set[int], set[int]] | None = None,
    rows: str = "auto",
) -> dict[str, Any]:
    """Start the cloud, wait until it is ready, then decode on it."""
    from cicada.client import Client

    start = time.perf_counter()
    start_cloud(stack, package, pin, rows)
    stack.wait_workers("cloud", state="ready", timeout=600)
    ready = time.perf_counter() - start
    with Client(stack.address, timeout=600) as client:
        times = []
        with client.stream(MODEL, prompt[None], max_new_tokens=n, exact=True) as stream:
            for _piece in stream:
                times.append(time.perf_counter() - start)
        result = stream.result
        assert result is not None
    done = time.perf_counter() - start
    span = times[-1] - times[0]
    return {
        "tokens": result.output.tolist(),
        "ready_s": ready,
        "result_s": done,
        "cloud_alone_tokens_per_s": (len(times) - 1) / span if span > 0 else None,
    }


def median(values: list[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return statistics.median(kept) if kept else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cicada.testing import Stack

    with tempfile.TemporaryDirectory(prefix="cicada-spec-") as tmp:
        work = args.cache or Path(tmp) / "cache"
        work.mkdir(parents=True, exist_ok=True)
        model, package, edge = build_assets(args, work)
        vocab = int(model.config.vocab_size)
        rng = np.random.default_rng(11)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        edge_args = ["--token-interval", str(args.token_interval), "--draft-interval", "0"]
        pin = pinning(args)
        modes = modes_for(args, pin)
        original_affinity = os.sched_getaffinity(0)
        if pin is not None:  # inherited by the coordinator and the edge agent
            os.sched_setaffinity(0, pin[0])
        for r in range(args.runs):
            prompt = rng.integers(0, vocab, size=16).astype(np.int64)
            expected = reference(model, prompt, args.tokens)
            for mode in modes:
                logs = (args.logs or Path(tmp)) / f"{mode}-{r}"
                logs.mkdir(parents=True)
                with Stack(logs) as stack:
                    stack.coordinator()
                    if not mode.startswith("cloud_only"):
                        stack.edge(MODEL, edge, "edge", *edge_args)
                        stack.wait_workers("edge")
                        got = run_edge_first(
                            stack,
                            package,
                            prompt,
                            args.tokens,
                            mode == "exact",
                            pin,
                            args.row_invariant,
                        )
                    else:
                        rows = "auto" if mode == "cloud_only_auto" else args.row_invariant
                        got = run_cloud_only(stack, package, prompt, args.tokens, pin, rows)
                got["matches_reference"] = got.pop("tokens") == expected
                got["run"] = r
                runs[mode].append(got)
                print(f"run {r} {mode}: " + json.dumps(got), flush=True)
        os.sched_setaffinity(0, original_affinity)
    exact, cloud, handoff = runs["exact"], runs["cloud_only"], runs["handoff"]
    cloud_auto = runs["cloud_only_auto"]
    drafted = sum(float(x["drafted"] or 0) for x in exact)
    accepted = sum(float(x["accepted"] or 0) for x in exact)
    summary: dict[str, Any] = {
        "model": "tiny-4-layer" if args.quick else "gpt2-medium-like",
        "tokens": args.tokens,
        "runs": args.runs,
        "exact_matches": sum(bool(x["matches_reference"] and x["exact"]) for x in exact),
        "cloud_only_matches": sum(bool(x["matches_reference"]) for x in cloud),
        "taken_over": sum(bool(x["cloud_tokens"]) for x in exact),
        "edge_ttft_s": median([x["edge_ttft_s"] for x in exact]),
        "exact_ttft_s": median([x["exact_ttft_s"] for x in exact]),
        "exact_result_s": median([x["result_s"] for x in exact]),
        "cloud_only_result_s": median([x["result_s"] for x in cloud]),
        "cloud_ready_s": median([x["ready_s"] for x in cloud]),
        "handoff_result_s": median([x["result_s"] for x in handoff]),
        "handoff_ttft_s": median([x["edge_ttft_s"] for x in handoff]),
        "drafted_tokens_per_s": median([x["tokens_per_s_after_takeover"] for x in exact]),
        "handoff_cloud_tokens_per_s": median([x["tokens_per_s_after_takeover"] for x in handoff]),
        "cloud_alone_tokens_per_s": median([x["cloud_alone_tokens_per_s"] for x in cloud]),
        "cloud_alone_auto_tokens_per_s": median(
            [x["cloud_alone_tokens_per_s"] for x in cloud_auto]
        ),
        "cloud_only_auto_result_s": median([x["result_s"] for x in cloud_auto]),
        "acceptance": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "rewound": median([x["rewound"] for x in exact]),
        "replayed": median([x["replayed"] for x in exact]),
        "row_invariant": args.row_invariant,
        "rows_exact": all(bool(x["rows_exact"]) for x in exact),
        "load_avg": loadavg(),
        "pinned": None if pin is None else {"others": sorted(pin[0]), "cloud": sorted(pin[1])},
    }
    s = summary
    if s["drafted_tokens_per_s"] and s["cloud_alone_tokens_per_s"]:
        s["speedup_tokens_per_s"] = s["drafted_tokens_per_s"] / s["cloud_alone_tokens_per_s"]
    if s["exact_result_s"] and s["cloud_only_result_s"]:
        s["exact_sooner_than_cloud_only_s"] = s["cloud_only_result_s"] - s["exact_result_s"]
        s["exact_over_cloud_only"] = s["exact_result_s"] / s["cloud_only_result_s"]
    # Against the fastest decode alone: the same worker's, or (one thread) MKL's on auto.
    alone = [v for v in (s["cloud_alone_tokens_per_s"], s["cloud_alone_auto_tokens_per_s"]) if v]
    if s["drafted_tokens_per_s"] and alone:
        s["speedup_vs_fastest_alone"] = s["drafted_tokens_per_s"] / max(alone)
    only = [v for v in (s["cloud_only_result_s"], s["cloud_only_auto_result_s"]) if v]
    if s["exact_result_s"] and only:
        s["exact_sooner_than_fastest_cloud_only_s"] = min(only) - s["exact_result_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "results.json"
    out.write_text(json.dumps({"summary": summary, "runs": runs, "args": vars(args) | {
        "out": str(args.out), "cache": str(args.cache)}, "machine": machine_info()},
        indent=2, default=str))  # fmt: skip
    print(f"wrote {out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
