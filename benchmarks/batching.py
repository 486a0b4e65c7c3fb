#!/usr/bin/env python3
"""Batching benchmark: forward throughput of the reference GPT-2 at batch 1, 2, 4, 8.

    python3 -m benchmarks.batching           # GPT-2-medium-like (24 x 1024, fp32), 32 tokens
    python3 -m benchmarks.batching --quick   # tiny GPT-2: a smoke run in seconds

What the cloud worker's dynamic batcher (cloud/batching.py) buys: one forward of k requests of
`--tokens` tokens each, against k forwards of one. The model is cloud/models/gpt2.py built
eagerly (seeded weights) and run under `torch.inference_mode()` with torch's own thread count
(or `--threads`), as the worker runs it. Each round times every batch size once, interleaved,
after one untimed warm-up forward per size (first touch of the weights and of the allocator's
pages); throughput = k / the median forward time over the rounds, and every batch size is
reported as a ratio to batch 1 measured in the same run.

Also checked, per batch size: whether each row of the batch is bit-identical (torch.equal) to
the same row run alone, and the largest absolute difference where it is not.

Decode throughput (continuous batching, the issue's deliverable 2) is not measured: the worker
does not batch generation yet, so the JSON has no `decode_tokens_per_s` key.

The last line of output is one JSON object: {"forward_per_s": {"1": ..., "8": ...}}.
Writes <out>/results.json with the machine, the load average and the per-round times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT, loadavg, machine_info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, 3 rounds")
    p.add_argument("--sizes", default="1,2,4,8", help="batch sizes, comma-separated")
    p.add_argument("--tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "batching")
    args = p.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: positive integers")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    return args


def model_config(quick: bool) -> dict[str, Any]:
    from cicada.cloud.models import gpt2

    return gpt2.tiny_config() if quick else {}  # {}: GPT-2-medium (gpt2.GPTConfig defaults)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cicada.cloud.models import gpt2

    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.quick)
    model = gpt2.build(**config)
    largest = max(args.sizes)
    ids = gpt2.example_input(config, batch=largest, seed=1)[:, : args.tokens]
    times: dict[int, list[float]] = {k: [] for k in args.sizes}
    identical: dict[int, bool] = {}
    max_diff: dict[int, float] = {}
    with torch.inference_mode():
        alone = torch.cat([model(ids[i : i + 1]) for i in range(largest)])
        for k in args.sizes:  # warm-up, and the bit-identity check
            out = model(ids[:k])
            identical[k] = bool(torch.equal(out, alone[:k]))
            max_diff[k] = float((out - alone[:k]).abs().max())
        for _ in range(args.rounds):
            for k in args.sizes:
                start = time.perf_counter()
                model(ids[:k])
                times[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    per_s = {k: k / median[k] for k in args.sizes}
    base = per_s[args.sizes[0]]
    return {
        "model": "gpt2-tiny" if args.quick else "gpt2-medium-like (24 x 1024, fp32)",
        "config": config,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "forward_s": {str(k): v for k, v in times.items()},
        "forward_per_s": {str(k): per_s[k] for k in args.sizes},
        "ratio_to_smallest": {str(k): per_s[k] / base for k in args.sizes},
        "bit_identical_to_alone": {str(k): identical[k] for k in args.sizes},
        "max_abs_diff_to_alone": {str(k): max_diff[k] for k in args.sizes},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    results = measure(args)
    results["machine"] = machine_info(["torch", "numpy"])
    results["loadavg_before"], results["loadavg_after"] = load_before, loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{results['model']}, {results['tokens']} tokens a request, "
          f"{results['threads']} torch threads, {results['rounds']} rounds, "
          f"load average {load_before} -> {results['loadavg_after']}")  # fmt: skip
    print("batch  forward s (median)  requests/s  x batch 1  bit-identical to alone")
    for k in map(str, sorted(int(s) for s in results["forward_per_s"])):
        print(f"{k:>5}  {statistics.median(results['forward_s'][k]):>18.4f}  "
              f"{results['forward_per_s'][k]:>10.2f}  {results['ratio_to_smallest'][k]:>9.2f}  "
              f"{results['bit_identical_to_alone'][k]!s:>5} "
              f"(max |diff| {results['max_abs_diff_to_alone'][k]:.2e})")  # fmt: skip
    per_s = {k: round(v, 3) for k, v in results["forward_per_s"].items()}
    print(json.dumps({"forward_per_s": per_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
