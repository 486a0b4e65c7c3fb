#!/usr/bin/env python3
"""The GPU loader's host side on CPU: read+hash rate of the parallel readers against the single
loop they replaced, and how much the readers get through while `import torch` runs.

    python3 benchmarks/gpu_readers.py                 # a ~380 MB GPT-2 package, 5 rounds
    python3 benchmarks/gpu_readers.py --quick         # a ~60 MB package, 2 rounds (smoke test)

No GPU is involved: this is the part of the GPU loader that runs on the host. The package is
packed by the benchmark (GPT-2, 8 x 768, fp32; 16 MiB block checksums) and read once first,
so the page cache is warm and what is measured is memory-speed `preadv` plus xxh3.

* **single loop**: the loader before this change, one thread reading each 64 MiB piece with
  `preadv` into one buffer and hashing it into its stage's xxh3 (the stage sum, in order);
* **ring, N readers**: `cloud/loading/ring.py` as the CUDA source runs it: N reader threads,
  `N + 2` slots, each reader checking its piece's block sums; the consumer releases each slot
  at once (on a GPU it enqueues an asynchronous copy, which costs the host nothing);
* **read only**: one thread, `preadv` without hashing: where hashing stops being the cost.

Rounds interleave the variants (noise spreads over all of them); each figure is the median,
and the ratios are to the single loop of the same run. Then, in a fresh process, the CUDA
source is opened before `import torch` (over the simulated device, as `cicada run` opens it)
and the bytes its readers have read and checked when the import returns are counted; and
fresh processes run to the first result over the simulated device with the loader opened
before `import torch` or only after it (alternating, medians): what reading during the
import saves, on this machine (the simulated copies are CPU memcpys).

Memory: a throwaway process touches and frees 1 GiB first (this VM charges ~2.4 s/GB for
memory it took back); every variant keeps its buffers from round to round, faulted in by an
untimed first round, so what is compared is reading and hashing, not page faults (a real load
faults its ring in once: `slots x 64 MiB`, in the reader threads).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 benchmarks/gpu_readers.py` from anywhere
    sys.path.insert(0, str(ROOT))

GiB = 1024**3
BOUND_S = 300.0


def make_package(work: Path, quick: bool) -> Path:
    from cicada.cloud.packing import pack

    config = {"n_layer": 2, "n_embd": 256, "n_head": 4} if quick else {
        "n_layer": 8, "n_embd": 768, "n_head": 12,
    }  # fmt: skip
    pack("cicada.cloud.models.gpt2:build", work / "pkg", config=config)
    return work / "pkg"


def single_loop(path: Path, pieces: list[Any], buf: memoryview) -> float:
    """The previous loader's host work: one thread, preadv then xxh3 of each piece in turn."""
    import xxhash

    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = xxhash.xxh3_64()
        for p in pieces:
            if p.first:
                digest = xxhash.xxh3_64()
            view, got = buf[: p.nbytes], 0
            while got < p.nbytes:
                got += os.preadv(fd, [view[got:]], p.begin + got)
            digest.update(view)
            if p.last and digest.hexdigest() != p.stage.xxh3:
                raise RuntimeError(f"stage {p.stage.name}: checksum mismatch")
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_only(path: Path, pieces: list[Any], buf: memoryview) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for p in pieces:
            got = 0
            while got < p.nbytes:
                got += os.preadv(fd, [buf[got : p.nbytes]], p.begin + got)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def ring(path: Path, pieces: list[Any], readers: int, buffers: list[mmap.mmap]) -> float:
    """The CUDA source's ring with `readers` threads, block sums checked, slots released at
    once by the consumer. `buffers`: its slots, reused from round to round (faulted in)."""
    from cicada.cloud.loading.ring import ReadRing

    failures: list[BaseException] = []
    start = time.perf_counter()
    r = ReadRing(path, pieces, slots=len(buffers), readers=readers, verify=True,
                 clock=time.perf_counter, on_error=lambda _p, _t, exc: failures.append(exc),
                 buffers=buffers)  # fmt: skip
    r.start()
    for p in pieces:
        if r.take(p.index) is None:
            break
        r.release(p.index, None)
    took = time.perf_counter() - start
    for t in r.threads:
        t.join(BOUND_S)
    if failures:
        raise RuntimeError(f"the ring failed: {failures[0]}")
    return took


IMPORT_PROBE = """
import json, sys, time
from pathlib import Path
from cicada.cloud.loading.cuda import CudaStageSource
from cicada.cloud.loading.simulated import SimulatedCuda
from cicada.cloud.pipeline import ColdStart
assert "torch" not in sys.modules
source = CudaStageSource.using(lambda _d: SimulatedCuda())
cold = ColdStart(Path(sys.argv[1]), source=source, reader_threads=int(sys.argv[2]))
begin = time.perf_counter()
import torch
took = time.perf_counter() - begin
ring = cold.source.ring
with ring.cond:
    ready = sum(p.nbytes for p, done in zip(ring.pieces, ring.ready) if done)
print(json.dumps({"import_s": took, "ready_bytes": ready,
                  "ring_bytes": len(ring.buffers) * len(ring.buffers[0])}))
"""


START_PROBE = """
import json, sys, time
begin = time.perf_counter()
from pathlib import Path
from cicada.cloud.loading.cuda import CudaStageSource
from cicada.cloud.loading.simulated import SimulatedCuda
from cicada.cloud.pipeline import ColdStart
source = CudaStageSource.using(lambda _d: SimulatedCuda())
def open_load():
    return ColdStart(Path(sys.argv[1]), source=source, reader_threads=int(sys.argv[2]))
if sys.argv[3] == "before":
    cold = open_load()
import torch
if sys.argv[3] == "after":
    cold = open_load()
from cicada.cloud.models import gpt2
x = gpt2.example_input(cold.manifest.architecture.config)
cold.forward(x)
print(json.dumps({"first_result_s": time.perf_counter() - begin}))
"""


def first_result(package: Path, readers: int, when: str) -> float:
    """A fresh process's time to the first result over the simulated device, the loader
    opened `before` or `after` `import torch`."""
    proc = subprocess.run(
        [sys.executable, "-c", START_PROBE, str(package), str(readers), when],
        cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the start probe failed: {proc.stderr[-800:]}")
    took: float = json.loads(proc.stdout.strip().splitlines()[-1])["first_result_s"]
    return took


def read_during_import(package: Path, readers: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(package), str(readers)],
                          cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the import probe failed: {proc.stderr[-800:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small package, 2 rounds")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--readers", default="1,2,4", help="reader counts for the ring")
    p.add_argument("--starts", type=int, default=None,
                   help="fresh-process starts per variant (default 3, --quick 1)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    counts = [int(n) for n in args.readers.split(",")]
    subprocess.run([sys.executable, "-c", f"b = bytearray({GiB}); del b"], check=True)

    from cicada.cloud.loading.cuda import CHUNK
    from cicada.cloud.loading.ring import plan_pieces
    from cicada.common.package import Manifest

    with tempfile.TemporaryDirectory(prefix="cicada-gpu-readers-") as tmp:
        package = make_package(Path(tmp), args.quick)
        manifest = Manifest.load(package)
        path = package / manifest.weights
        path.read_bytes()  # the page cache warm
        nbytes = manifest.total_bytes
        pieces = plan_pieces(manifest, CHUNK)
        slot = max(p.nbytes for p in pieces)
        one = memoryview(mmap.mmap(-1, slot))
        variants: dict[str, Callable[[], float]] = {
            "single loop": lambda: single_loop(path, pieces, one),
            "read only (1 thread, no hash)": lambda: read_only(path, pieces, one),
        }
        for n in counts:
            slots = [mmap.mmap(-1, slot) for _ in range(n + 2)]
            variants[f"ring, {n} reader{'s' if n > 1 else ''}"] = (
                lambda n=n, slots=slots: ring(path, pieces, n, slots)  # type: ignore[misc]
            )
        for run in variants.values():
            run()  # untimed: faults the buffers in
        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            order = list(variants)
            order = order[r % len(order) :] + order[: r % len(order)]
            for name in order:
                times[name].append(variants[name]())
        probe = read_during_import(package, max(counts))
        starts: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.starts if args.starts is not None else (1 if args.quick else 3)):
            for when in starts:
                starts[when].append(first_result(package, max(counts), when))
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"package {nbytes / 1e6:.0f} MB, {len(manifest.stages)} stages, {len(pieces)} pieces; "
          f"{cpus} CPUs, load average {load:.2f}; {rounds} rounds, medians")  # fmt: skip
    base = statistics.median(times["single loop"])
    rates: dict[str, float] = {}
    for name, samples in times.items():
        took = statistics.median(samples)
        rates[name] = nbytes / took / 1e9
        print(f"  {name:32s} {rates[name]:6.2f} GB/s  x{base / took:5.2f} the single loop")
    print(f"  during `import torch` ({probe['import_s']:.2f} s): "
          f"{probe['ready_bytes'] / 1e6:.0f} MB read and checked by {max(counts)} readers "
          f"(ring {probe['ring_bytes'] / 1e6:.0f} MB)")  # fmt: skip
    first = {when: statistics.median(t) for when, t in starts.items()}
    print(f"  first result over the simulated device, fresh process: loader opened before "
          f"`import torch` {first['before']:.2f} s, after it {first['after']:.2f} s "
          f"(x{first['after'] / first['before']:.2f})")  # fmt: skip
    print(json.dumps({"bytes": nbytes, "cpus": cpus, "load": load, "rounds": rounds,
                      "gb_s": rates, "import_probe": probe, "first_result_s": first,
                      "speedup": {k: rates[k] / rates["single loop"] for k in rates}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
