#!/usr/bin/env python3
"""Draft benchmark (issue 13): a full-depth int8 edge draft, and speculative decoding with it.

    python3 -m benchmarks.draft           # GPT-2-medium-like (24 x 1024, fp32), 256 tokens
    python3 -m benchmarks.draft --quick   # tiny GPT-2 (4 layers): a smoke run

The cloud model is cloud/models/gpt2.py built eagerly (seeded, nothing downloaded) with its
blocks' matrices scaled by `--scale`: the plain seeded GPT-2 mostly repeats its last token (its
residual stream is dominated by the tied token embedding), which every draft predicts, so it
would measure nothing. Scaled, its greedy decode depends on the context. It is packed
(`cicada pack`) and exported twice with `cicada export-edge --int8`: full depth
(`--full-depth`) and the default truncated variant (a quarter of the layers, the package's
tensors copied), both int8 weights, ONNX Runtime.

(a) Agreement with the fp32 cloud model: for `--prompts` random prompts the cloud decodes
`--agree-tokens` greedily; one edge forward over each sequence gives the edge's greedy token
at every position given the cloud's prefix. Reported: the share of positions where they are
equal, and the mean accepted run (from each position, how many tokens in a row agree: what an
unbounded γ would accept there).
(b) The draft's speed on the edge: tokens/s of edge/drafter.py (the cached int8 step graph)
drafting 32 tokens after a 16-token prompt, ONNX Runtime with 1 intra-op thread and with
one per core; the median of `--rounds`.
(c) Speculative decode of `--tokens` tokens after a 16-token prompt: the cloud alone (the
worker's own greedy decode, cloud/generate.py, one token per forward) against the cloud
verifying edge drafts (cloud/speculative.py, adaptive γ 1..8) with the full-depth int8
draft (1 ORT thread), run SEQUENTIALLY in this process: draft, then verify, then draft…
Reported: tokens/s of each and their ratio (`speedup_sequential`: the draft's time and the
cloud's share the cores, as they would if both ran on this machine), and the ratio counting
the cloud's verify time alone (`speedup_cloud_only`: the bound when the draft runs on its own
device and is hidden behind the cloud's forwards; transfers not counted), the acceptance rate
(accepted / drafted), tokens per cloud forward, how often the margin guard fired, and whether
the output equals the cloud alone's bit for bit. Timed once each after one untimed warm-up
(the runs are long); interleaved in `--rounds` rounds, the median.

Memory is not primed (DESIGN.md's trap): every figure is a steady state after a warm-up.
The last line of output is one JSON object with the figures; <out>/results.json has them all,
with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import ROOT, loadavg, machine_info

FACTORY = "cicada.cloud.models.gpt2:build"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 (4 layers)")
    p.add_argument("--tokens", type=int, default=None, help="decoded (default 256, quick 40)")
    p.add_argument("--prompts", type=int, default=None, help="for agreement (default 8, quick 6)")
    p.add_argument("--agree-tokens", type=int, default=None, help="default 32, quick 24")
    p.add_argument(
        "--scale", type=float, default=None, help="blocks' matrices x (default 2, quick 4)"
    )
    p.add_argument("--rounds", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "draft")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("tokens", 256, 40), ("prompts", 8, 6), ("agree_tokens", 32, 24),
                              ("scale", 2.0, 4.0), ("rounds", 3, 1)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def model_config(quick: bool) -> dict[str, Any]:
    from cicada.cloud.models import gpt2

    if quick:
        return {**gpt2.tiny_config(), "n_layer": 4, "seed": 3}
    return {}  # GPT-2-medium (gpt2.GPTConfig defaults)


def cloud_model(config: dict[str, Any], scale: float) -> Any:
    import torch

    from cicada.cloud.models import gpt2

    model = gpt2.build(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name and p.dim() == 2:
                p.mul_(scale)
    return model


def export(model: Any, config: dict[str, Any], work: Path) -> dict[str, Path]:
    """Pack the cloud model; export its full-depth and truncated int8 drafts. Seconds each."""
    from cicada.cloud.export_edge import export_edge
    from cicada.cloud.packing import pack

    pack(FACTORY, work / "pkg", config=config, model=model, force=True)
    export_edge(work / "pkg", work / "full", int8=True, full_depth=True, force=True)
    export_edge(work / "pkg", work / "cut", int8=True, force=True)
    return {"full": work / "full", "cut": work / "cut"}


def reference(model: Any, prompt: np.ndarray, n: int) -> tuple[list[int], float]:
    from cicada.cloud.generate import decoder_for
    from cicada.common.generation import GenerationRequest, generate

    start = time.perf_counter()
    tokens = generate(decoder_for(model), GenerationRequest(prompt, n), lambda t: None).tokens
    return tokens, time.perf_counter() - start


def agreement(edge: Any, model: Any, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(5)
    vocab = model.config.vocab_size
    hits: list[bool] = []
    runs: list[int] = []
    for _ in range(args.prompts):
        prompt = rng.integers(0, vocab, size=int(rng.integers(4, 17))).astype(np.int64)
        tokens, _ = reference(model, prompt, args.agree_tokens)
        seq = np.concatenate([prompt, tokens])[None, :-1]
        guesses = edge.run([seq])[0][0, len(prompt) - 1 :].argmax(-1)
        agree = [bool(g == t) for g, t in zip(guesses, tokens, strict=True)]
        hits += agree
        for i in range(len(agree)):  # the run of agreement starting at each position
            j = i
            while j < len(agree) and agree[j]:
                j += 1
            runs.append(j - i)
    return {"agreement": float(np.mean(hits)), "mean_accepted_run": float(np.mean(runs))}


def draft_speed(path: Path, vocab: int, rounds: int) -> dict[str, float]:
    import os

    from cicada.edge.onnx_model import EdgeModel

    prompt = list(range(16))
    out = {}
    for label, threads in (("1_thread", 1), ("default", os.cpu_count() or 1)):
        edge = EdgeModel.load(path, intra_op_num_threads=threads)
        times = []
        for _ in range(rounds + 1):  # the first is a warm-up
            drafter = edge.new_drafter()
            assert drafter is not None
            start = time.perf_counter()
            drafter.draft(prompt, 32)
            times.append(time.perf_counter() - start)
        out[label] = 32 / statistics.median(times[1:])
    return out


def speculative(model: Any, edge_dir: Path, prompt: np.ndarray, n: int) -> dict[str, Any]:
    from cicada.cloud.speculative import AdaptiveGamma, Verifier, speculative_generate
    from cicada.edge.onnx_model import EdgeModel

    edge = EdgeModel.load(edge_dir, intra_op_num_threads=1)
    drafter = edge.new_drafter()
    assert drafter is not None
    spent = {"draft": 0.0}

    def draft(seq: list[int], gamma: int) -> list[int]:
        start = time.perf_counter()
        try:
            return drafter.draft(seq, gamma)
        finally:
            spent["draft"] += time.perf_counter() - start

    verifier = Verifier(model)
    start = time.perf_counter()
    result = speculative_generate(verifier, prompt, n, draft, AdaptiveGamma())
    wall = time.perf_counter() - start
    stats = result.stats
    return {
        "tokens": result.tokens,
        "wall_s": wall,
        "draft_s": spent["draft"],
        "cloud_s": wall - spent["draft"],
        "rounds": stats.rounds,
        "cloud_forwards": stats.forwards,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "guard_fired": stats.guard_fired,
        "replayed_positions": stats.replayed_positions,
        "min_margin": stats.min_margin,
        "gammas": result.gammas,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    config = model_config(args.quick)
    model = cloud_model(config, args.scale)
    work = args.out / "work"
    t0 = time.perf_counter()
    dirs = export(model, config, work)
    export_s = time.perf_counter() - t0
    from cicada.edge.onnx_model import EdgeModel

    vocab = model.config.vocab_size
    agree = {k: agreement(EdgeModel.load(d), model, args) for k, d in dirs.items()}
    speed = {k: draft_speed(d, vocab, args.rounds) for k, d in dirs.items()}

    prompt = np.random.default_rng(9).integers(0, vocab, size=16).astype(np.int64)
    reference(model, prompt, min(8, args.tokens))  # warm-up
    speculative(model, dirs["full"], prompt, min(8, args.tokens))
    alone_s: list[float] = []
    runs: list[dict[str, Any]] = []
    identical = True
    for _ in range(args.rounds):
        tokens, seconds = reference(model, prompt, args.tokens)
        alone_s.append(seconds)
        run = speculative(model, dirs["full"], prompt, args.tokens)
        identical = identical and run["tokens"] == tokens
        runs.append(run)
    alone = args.tokens / statistics.median(alone_s)
    wall = statistics.median(r["wall_s"] for r in runs)
    cloud = statistics.median(r["cloud_s"] for r in runs)
    last = runs[-1]
    return {
        "model": "gpt2-tiny (4 layers)" if args.quick else "gpt2-medium-like (24 x 1024, fp32)",
        "config": config,
        "scale": args.scale,
        "threads": torch.get_num_threads(),
        "export_s": export_s,
        "agreement": {k: v["agreement"] for k, v in agree.items()},
        "mean_accepted_run": {k: v["mean_accepted_run"] for k, v in agree.items()},
        "draft_tokens_per_s": speed,
        "decode_tokens": args.tokens,
        "cloud_alone_tokens_per_s": alone,
        "speculative_tokens_per_s": args.tokens / wall,
        "speculative_cloud_only_tokens_per_s": args.tokens / cloud,
        "speedup_sequential": args.tokens / wall / alone,
        "speedup_cloud_only": args.tokens / cloud / alone,
        "acceptance_rate": last["accepted"] / max(1, last["drafted"]),
        "tokens_per_cloud_forward": args.tokens / last["cloud_forwards"],
        "guard_fired": last["guard_fired"],
        "bit_identical": identical,
        "alone_s": alone_s,
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    results = measure(args)
    results["machine"] = machine_info(["torch", "numpy", "onnxruntime"])
    results["loadavg_before"], results["loadavg_after"] = load_before, loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    r = results
    print(
        f"{r['model']}, blocks x {r['scale']}, {r['threads']} torch threads, load average "
        f"{load_before} -> {r['loadavg_after']}; packed and exported in {r['export_s']:.0f} s"
    )
    for k in ("full", "cut"):
        print(
            f"{k:>4} int8 draft: agreement {r['agreement'][k]:.3f}, mean accepted run "
            f"{r['mean_accepted_run'][k]:.2f}, drafts {r['draft_tokens_per_s'][k]['1_thread']:.1f}"
            f" tokens/s (1 thread), {r['draft_tokens_per_s'][k]['default']:.1f} (all cores)"
        )
    print(f"decode {r['decode_tokens']} tokens: cloud alone {r['cloud_alone_tokens_per_s']:.2f}/s, "
          f"with full-depth drafts {r['speculative_tokens_per_s']:.2f}/s sequential "
          f"(x{r['speedup_sequential']:.2f}), {r['speculative_cloud_only_tokens_per_s']:.2f}/s "
          f"counting the cloud alone (x{r['speedup_cloud_only']:.2f}); acceptance "
          f"{r['acceptance_rate']:.2f}, {r['tokens_per_cloud_forward']:.2f} tokens a forward, "
          f"guard fired {r['guard_fired']}, bit-identical {r['bit_identical']}")  # fmt: skip
    keys = ("agreement", "mean_accepted_run", "draft_tokens_per_s", "cloud_alone_tokens_per_s",
            "speculative_tokens_per_s", "speculative_cloud_only_tokens_per_s",
            "speedup_sequential", "speedup_cloud_only", "acceptance_rate",
            "tokens_per_cloud_forward", "guard_fired", "bit_identical")  # fmt: skip
    print(json.dumps({k: _rounded(results[k]) for k in keys}))
    return 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    sys.exit(main())
