#!/usr/bin/env python3
"""Exact generations: time to the first (provisional) token, against today's generations.

    python3 -m benchmarks.exact_ttft             # tiny GPT-2, 40 calls of each kind
    python3 -m benchmarks.exact_ttft --quick     # 6 of each: a smoke test

An exact generation (`exact=True`, docs/PROTOCOL.md section 12) must show its first token at
the edge's latency: while the cloud is cold the edge's tokens stream at once, marked
provisional. Real processes (cicada.testing.Stack): a coordinator and an edge agent (the int8
edge variant of the package), no cloud worker, so every call runs on the edge. Calls alternate
exact and not, on one client; timed on the client from the stream's start to its first piece.
Prints the medians and their ratio (target: exact <= 1.1 x edge-only), measured in the same
run. Writes <out>/results.json.
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

import numpy as np

from benchmarks.machine import ROOT, machine_info
from cicada.client import Client
from cicada.testing import Stack

MODEL = "gpt2"


def first_piece_s(client: Client, prompt: np.ndarray, tokens: int, exact: bool) -> float:
    start = time.perf_counter()
    with client.stream(MODEL, prompt, max_new_tokens=tokens, exact=exact) as stream:
        piece = next(stream)
        elapsed = time.perf_counter() - start
        assert piece.provisional == exact, "an exact call's edge token is provisional"
        for _ in stream:
            pass
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40, help="calls of each kind")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="6 calls of each kind")
    ap.add_argument("--cache", type=Path, default=None, help="package cache (CICADA_CACHE)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "exact_ttft")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.calls = 6
    from cicada.cloud.export_edge import export_edge
    from cicada.demos.cold_start import default_cache, ensure_package

    cache = opts.cache or default_cache()
    package = ensure_package("gpt2-tiny", cache)
    edge_dir = cache / "edge" / "gpt2-tiny"
    if not (edge_dir / "edge_model.json").exists():
        export_edge(package, edge_dir, int8=True, force=True)
    prompt = np.random.default_rng(0).integers(0, 50, (1, 16), dtype=np.int64)
    times: dict[str, list[float]] = {"edge-only": [], "exact": []}
    with tempfile.TemporaryDirectory(prefix="cicada-exact-") as tmp, Stack(Path(tmp)) as stack:
        stack.coordinator()
        stack.edge(MODEL, edge_dir, "edge")
        stack.wait_workers("edge")
        with Client(stack.address, timeout=60) as client:
            first_piece_s(client, prompt, opts.tokens, False)  # warm: sessions, sockets
            for i in range(2 * opts.calls):
                exact = i % 2 == 1
                times["exact" if exact else "edge-only"].append(
                    first_piece_s(client, prompt, opts.tokens, exact)
                )
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["exact"] / median["edge-only"]
    for kind, value in median.items():
        print(f"{kind}: median time to first token {value * 1000:.2f} ms ({opts.calls} calls)")
    print(f"exact / edge-only: {ratio:.3f} (target <= 1.1)")
    opts.out.mkdir(parents=True, exist_ok=True)
    out = opts.out / "results.json"
    out.write_text(json.dumps({
        "calls": opts.calls, "tokens": opts.tokens, "ttft_s": times, "median_s": median,
        "ratio_exact_over_edge_only": ratio, "machine": {**machine_info(), "cpus": os.cpu_count()},
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
