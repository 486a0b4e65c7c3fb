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
`--no-pack` decodes without the packed weights (Streams(pack=False)), for a comparison.
`--cpu-clock` times the decode steps by this thread's CPU time instead of the wall clock: with
`--threads 1` that is the work of a step, less the time other processes take the core away on
a shared machine (memory-bandwidth contention still counts).

The floor (not with --quick): what this machine allows a decode step, from the bytes a step
reads and the FLOPs of 8 rows. Measured in the same run: the read bandwidth of the linear
weights (a sum over each, best of 3), the matmul rate at 8 rows of each linear shape on a
cache-resident weight (packed, as the step runs it), and a 1024^3 matmul for the CPU's peak;
then the linears of one step on the model's own weights at 1 row (torch) and at 8 rows (torch,
packed). Best ratio = 8 x (bytes / bandwidth) / max(bytes / bandwidth, FLOPs / rate).

The last line of output is one JSON object:
{"forward_per_s": {"1": ..., "8": ...}, "decode_tokens_per_s": {"1": ..., "8": ...}}.
Writes <out>/results.json with the machine, the load average and the per-round times.
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--no-pack", action="store_true", help="decode without packed weights")
    p.add_argument("--no-floor", action="store_true", help="skip the floor measurement")
    p.add_argument("--cpu-clock", action="store_true", help="decode timed by thread CPU time")
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
    return measure_padded(args, model, ids) | {
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


def measure_padded(args: argparse.Namespace, model: Any, ids: Any) -> dict[str, Any]:
    """Requests of different lengths (`pad_sequences`, cloud/batching.py): the largest batch
    size's requests cut to lengths spread evenly from a quarter of `--tokens` to all of it, run
    as one forward padded to the longest (what the worker runs) against one forward each;
    interleaved rounds, medians. And each request's logits, cut back, against it alone."""
    import numpy as np
    import torch

    from cicada.cloud.batching import cut_sequences, pad_and_join

    k = max(args.sizes)
    low = max(1, args.tokens // 4)
    lengths = [low + (args.tokens - low) * i // max(1, k - 1) for i in range(k)]
    requests = [[ids[i : i + 1, :n].numpy()] for i, n in enumerate(lengths)]
    (joined,), _ = pad_and_join(requests)  # the lengths it returns are `lengths`
    longest = max(lengths)
    batch = torch.from_numpy(joined)
    alone_s: list[float] = []
    padded_s: list[float] = []
    with torch.inference_mode():
        alone = [model(torch.from_numpy(r[0])).numpy() for r in requests]  # also the warm-up
        out = model(batch).numpy()
        diffs = []
        for i, n in enumerate(lengths):
            (mine,) = cut_sequences([out[i : i + 1]], n, longest, [0])
            diffs.append(float(np.abs(mine - alone[i]).max()))
        for _ in range(args.rounds):
            start = time.perf_counter()
            for r in requests:
                model(torch.from_numpy(r[0]))
            alone_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(batch)
            padded_s.append(time.perf_counter() - start)
    return {
        "padded_lengths": lengths,
        "padded_alone_s": alone_s,
        "padded_batch_s": padded_s,
        "padded_ratio_to_alone": statistics.median(alone_s) / statistics.median(padded_s),
        "padded_max_abs_diff_to_alone": max(diffs),
        "padded_bit_identical_to_alone": all(d == 0 for d in diffs),
    }


def decode(
    streams: Any, prompts: list[Any], steps: int, clock: Any = time.perf_counter
) -> tuple[float, list[list[int]]]:
    """Seconds of `steps` batched steps of one stream per prompt, and each stream's tokens.
    `streams` (cloud.continuous.Streams) is reused from call to call, as the worker keeps one
    per model: its weights are packed once, at its first step of two or more streams."""
    from cicada.cloud.continuous import DecodeStream
    from cicada.common.generation import GenerationRequest

    made = [DecodeStream(GenerationRequest(p, steps + 1), lambda t: None) for p in prompts]
    for s in made:
        streams.start(s)  # prefill alone: not timed
    start = clock()
    while streams.active:
        streams.step()
    return clock() - start, [s.tokens for s in made]


def measure_decode(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from cicada.cloud.models import gpt2

    config = model_config(args.quick)
    model = gpt2.build(**config)
    largest = max(args.sizes)
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, size=args.tokens + i, dtype=np.int64) for i in range(largest)]
    pack = not args.no_pack
    clock = time.thread_time if args.cpu_clock else time.perf_counter
    from cicada.cloud.continuous import Streams

    alone = [decode(Streams(model, limit=1), [p], args.decode_tokens)[1][0] for p in prompts]
    streams = Streams(model, limit=largest, pack=pack)
    times: dict[int, list[float]] = {k: [] for k in args.sizes}
    equal: dict[int, bool] = {}
    rss = resident_bytes()
    for k in args.sizes:  # warm-up (the packing, at the first size > 1), and the token check
        equal[k] = decode(streams, prompts[:k], args.decode_tokens)[1] == alone[:k]
    if pack:  # rows mode (cloud/few_rows.py) reorders the weights in the background: wait
        from cicada.cloud.few_rows import reorder_in_background, rows_available

        reordering = reorder_in_background(model) if rows_available("cpu") else None
        if reordering is not None:
            reordering.join()
    rss_growth = resident_bytes() - rss
    for _ in range(args.decode_rounds):
        for k in args.sizes:
            times[k].append(decode(streams, prompts[:k], args.decode_tokens, clock)[0])
    per_s = {k: k * args.decode_tokens / statistics.median(times[k]) for k in args.sizes}
    base = per_s[args.sizes[0]]
    return {
        "decode_steps": args.decode_tokens,
        "decode_s": {str(k): v for k, v in times.items()},
        "decode_tokens_per_s": {str(k): per_s[k] for k in args.sizes},
        "decode_ratio_to_smallest": {str(k): per_s[k] / base for k in args.sizes},
        "tokens_equal_to_alone": {str(k): equal[k] for k in args.sizes},
        "decode_packed": pack,
        "decode_rows_mode": rows_available_now(),
        "decode_clock": "thread CPU time" if args.cpu_clock else "wall",
        # Memory the warm-up decodes kept (the packed weights, mostly), per /proc/self/statm.
        "decode_rss_growth_bytes": rss_growth,
    }


def rows_available_now() -> bool:
    from cicada.cloud.few_rows import rows_available

    return rows_available("cpu")


def resident_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def best_time(run: Any, rounds: int = 3, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def measure_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The bytes and FLOPs of a decode step's linear layers, and what this CPU does with them."""
    from collections import Counter

    import torch
    import torch.nn.functional as F

    from cicada.cloud.continuous import PackedLinears
    from cicada.cloud.models import gpt2

    model = gpt2.build(**model_config(args.quick))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    params = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    nbytes = sum(t.numel() * t.element_size() for t in params)
    rows = PackedLinears.ROWS
    shapes = Counter((lin.out_features, lin.in_features) for lin in linears)
    flops = sum(2 * rows * n * k * count for (n, k), count in shapes.items())
    packed = PackedLinears() if PackedLinears.available("cpu") else None
    with torch.inference_mode():
        read_s = best_time(lambda: [t.sum() for t in params])
        a = torch.randn(1024, 1024)
        peak = 2 * 1024**3 / best_time(lambda: torch.mm(a, a), reps=10)
        compute_s, rates = 0.0, {}
        for (n, k), count in shapes.items():
            one = torch.nn.Linear(k, min(n, 4096), bias=False)  # <= 16 MB: stays in cache
            x = torch.randn(rows, k)
            run = (lambda: packed(one, x)) if packed else (lambda: F.linear(x, one.weight))  # noqa: B023
            rate = 2 * rows * one.weight.numel() / best_time(run, reps=20)
            rates[f"{n}x{k}"] = rate
            compute_s += 2 * rows * n * k * count / rate
        xs = {k: torch.randn(rows, k) for _, k in shapes}

        def step(m: int, use: PackedLinears | None) -> None:
            for lin in linears:
                x = xs[lin.in_features][:m]
                use(lin, x) if use else lin(x)

        step_1 = best_time(lambda: step(1, None))
        step_8 = best_time(lambda: step(rows, None))
        step_8_packed = best_time(lambda: step(rows, packed)) if packed else None
    return {
        "floor_linear_bytes": nbytes,
        "floor_read_bandwidth_bytes_per_s": nbytes / read_s,
        "floor_read_s": read_s,
        "floor_flops_at_rows": flops,
        "floor_rows": rows,
        "floor_rate_flops_per_s": rates,
        "floor_peak_flops_per_s": peak,
        "floor_compute_s": compute_s,
        "floor_best_ratio": rows * read_s / max(read_s, compute_s),
        "linears_step_s": {"1": step_1, f"{rows}": step_8, f"{rows} packed": step_8_packed},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    results = measure(args)
    results.update(measure_decode(args))
    if not (args.quick or args.no_floor):
        results.update(measure_floor(args))
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
    lengths = results["padded_lengths"]
    print(f"{len(lengths)} requests of {lengths[0]}-{lengths[-1]} tokens, one forward padded "
          f"to the longest: {statistics.median(results['padded_batch_s']):.4f} s against "
          f"{statistics.median(results['padded_alone_s']):.4f} s one by one = "
          f"{results['padded_ratio_to_alone']:.2f} x the requests/s; bit-identical to alone "
          f"{results['padded_bit_identical_to_alone']} "
          f"(max |diff| {results['padded_max_abs_diff_to_alone']:.2e})")  # fmt: skip
    print(f"streams  decode tokens/s  x 1 stream  tokens equal to alone "
          f"({results['decode_steps']} steps, {results['decode_clock']} clock, "
          f"packed: {results['decode_packed']})")  # fmt: skip
    for k in map(str, sorted(int(s) for s in results["decode_tokens_per_s"])):
        print(f"{k:>7}  {results['decode_tokens_per_s'][k]:>15.2f}  "
              f"{results['decode_ratio_to_smallest'][k]:>10.2f}  "
              f"{results['tokens_equal_to_alone'][k]!s:>5}")  # fmt: skip
    if "floor_read_s" in results:
        r, lin = results, results["linears_step_s"]
        print(f"floor: linears read {r['floor_linear_bytes'] / 1e9:.2f} GB a step at "
              f"{r['floor_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s = "
              f"{r['floor_read_s']:.3f} s; "
              f"{r['floor_flops_at_rows'] / 1e9:.1f} GFLOP at {r['floor_rows']} rows = "
              f"{r['floor_compute_s']:.3f} s at the measured rates "
              f"({min(r['floor_rate_flops_per_s'].values()) / 1e9:.0f}-"
              f"{max(r['floor_rate_flops_per_s'].values()) / 1e9:.0f} GFLOP/s; "
              f"1024^3 matmul {r['floor_peak_flops_per_s'] / 1e9:.0f} GFLOP/s): "
              f"best ratio {r['floor_best_ratio']:.2f} x")  # fmt: skip
        print("linears of one step: " + ", ".join(
            f"{k} rows {v:.3f} s" for k, v in lin.items() if v is not None))  # fmt: skip
    last = {
        key: {k: round(v, 3) for k, v in results[key].items()}
        for key in ("forward_per_s", "decode_tokens_per_s")
    }
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
