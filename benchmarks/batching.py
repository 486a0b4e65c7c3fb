#!/usr/bin/env python3
"""Batching benchmark: forward and decode throughput of the reference GPT-2 at 1, 2, 4, 8.

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

Decode throughput (continuous batching, cloud/continuous.py): k streams, each with its own
prompt (`--tokens` + its index tokens long: no two alike) prefilled alone, then decoded
together for `--decode-tokens` steps; tokens/s = k x steps / the time of the steps (prefills
excluded), the median over `--decode-rounds` rounds after one untimed warm-up per size. Also
checked: each stream's tokens equal its own greedy decode alone (`tokens_equal_to_alone`).

The last line of output is one JSON object:
{"forward_per_s": {"1": ..., "8": ...}, "decode_tokens_per_s": {"1": ..., "8": ...}}.
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
    p.add_argument("--decode-tokens", type=int, default=None, help="steps (default 16, quick 8)")
    p.add_argument("--decode-rounds", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "batching")
    args = p.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: positive integers")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.decode_tokens is None:
        args.decode_tokens = 8 if args.quick else 16
    if args.decode_rounds is None:
        args.decode_rounds = 1 if args.quick else 3
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


def decode(model: Any, prompts: list[Any], steps: int) -> tuple[float, list[list[int]]]:
    """Seconds of `steps` batched steps of one stream per prompt, and each stream's tokens."""
    from cicada.cloud.continuous import DecodeStream, Streams
    from cicada.common.generation import GenerationRequest

    streams = Streams(model, limit=len(prompts))
    made = [DecodeStream(GenerationRequest(p, steps + 1), lambda t: None) for p in prompts]
    for s in made:
        streams.start(s)  # prefill alone: not timed
    start = time.perf_counter()
    while streams.active:
        streams.step()
    return time.perf_counter() - start, [s.tokens for s in made]


def measure_decode(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from cicada.cloud.models import gpt2

    config = model_config(args.quick)
    model = gpt2.build(**config)
    largest = max(args.sizes)
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, size=args.tokens + i, dtype=np.int64) for i in range(largest)]
    alone = [decode(model, [p], args.decode_tokens)[1][0] for p in prompts]
    times: dict[int, list[float]] = {k: [] for k in args.sizes}
    equal: dict[int, bool] = {}
    for k in args.sizes:  # warm-up, and the token check
        equal[k] = decode(model, prompts[:k], args.decode_tokens)[1] == alone[:k]
    for _ in range(args.decode_rounds):
        for k in args.sizes:
            times[k].append(decode(model, prompts[:k], args.decode_tokens)[0])
    per_s = {k: k * args.decode_tokens / statistics.median(times[k]) for k in args.sizes}
    base = per_s[args.sizes[0]]
    return {
        "decode_steps": args.decode_tokens,
        "decode_s": {str(k): v for k, v in times.items()},
        "decode_tokens_per_s": {str(k): per_s[k] for k in args.sizes},
        "decode_ratio_to_smallest": {str(k): per_s[k] / base for k in args.sizes},
        "tokens_equal_to_alone": {str(k): equal[k] for k in args.sizes},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    results = measure(args)
    results.update(measure_decode(args))
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
    print(f"streams  decode tokens/s  x 1 stream  tokens equal to alone "
          f"({results['decode_steps']} steps)")  # fmt: skip
    for k in map(str, sorted(int(s) for s in results["decode_tokens_per_s"])):
        print(f"{k:>7}  {results['decode_tokens_per_s'][k]:>15.2f}  "
              f"{results['decode_ratio_to_smallest'][k]:>10.2f}  "
              f"{results['tokens_equal_to_alone'][k]!s:>5}")  # fmt: skip
    last = {
        key: {k: round(v, 3) for k, v in results[key].items()}
        for key in ("forward_per_s", "decode_tokens_per_s")
    }
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
