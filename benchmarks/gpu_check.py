#!/usr/bin/env python3
"""GPU check: is the CUDA loader correct and fast on this machine? One PASS/FAIL line per check,
figures beside them; exits 0 only when every check that ran passed.

    python3 benchmarks/gpu_check.py --device cuda            # on a GPU (see the status below)
    python3 benchmarks/gpu_check.py --device cpu --quick     # the dry run, on any CPU

Checks, on `--device`:

* bit-identity to eager on the same device for the reference GPT-2, BERT and ResNet
  (cloud/models) and, if transformers is installed, its BertModel: each cold-started through the
  CUDA stage source (cloud/loading/cuda.py). On CPU that source runs over a simulated device
  (cloud/loading/simulated.py: copies enqueued on a stream, completing later, in order), so the
  loader's own logic is what is checked; the CPU stage source is checked beside it;
* the parallel readers (3 threads, a package with 4 KiB block checksums, several pieces per
  stage) give the same bit-identical result, and a corrupt block ends in an error naming its
  stage and block;
* a corrupt stage and an injected loader error (a copy that raises) end in an error within a
  bound, never a hang;
* GPU only: pinned host-to-device bandwidth; the weights file's read bandwidth (page cache
  warm, as many threads as the loader's readers); and a multi-GB package (GPT-2-XL-sized,
  ~6 GB fp32; `--quick`: GPT-2-medium-sized) cold-started in fresh processes by each strategy
  (`python -m cicada run --device cuda`), the peers in their GPU modes included
  (peer-fastsafetensors, peer-runai, peer-tensorizer; each SKIPped by name when its package is
  not installed): time to first result, load GB/s, cicada's ratio to the floor
  max(import, bytes / min(read bandwidth, pinned H2D bandwidth)) + construct + last stage
  (target <= 1.2), cicada's transfer rate (first copy enqueued to last stage resident) as a
  share of min(H2D, read bandwidth) (target >= 0.8), and whether cicada is faster than every
  peer in the same run.

STATUS: the GPU-only part (`gpu_bandwidth`, `read_bandwidth`, `gpu_cold_starts`) is written but
has NOT YET RUN ON A GPU: no GPU was lent to the sessions that wrote it. The CPU dry run is what
was run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 benchmarks/gpu_check.py` from anywhere
    sys.path.insert(0, str(ROOT))

BOUND_S = 120.0  # a check that has not ended by then is a hang: FAIL, never waited out
RUN_TIMEOUT_S = 600.0


class Report:
    """PASS/FAIL/SKIP lines as they happen; `failed` counts the FAILs."""

    def __init__(self) -> None:
        self.failed = 0
        self.figures: dict[str, Any] = {}

    def line(self, verdict: str, name: str, detail: str = "") -> None:
        if verdict == "FAIL":
            self.failed += 1
        print(f"{verdict} {name}" + (f": {detail}" if detail else ""), flush=True)

    def check(self, name: str, run: Callable[[], str]) -> None:
        """Run `run` on a thread, bounded by BOUND_S; its return value is the PASS detail."""
        outcome: list[tuple[str, str]] = []

        def target() -> None:
            try:
                outcome.append(("PASS", run()))
            except AssertionError as exc:
                outcome.append(("FAIL", str(exc)))
            except Exception as exc:
                outcome.append(("FAIL", f"{type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=target, name=f"check-{name}", daemon=True)
        thread.start()
        thread.join(BOUND_S)
        if not outcome:
            self.line("FAIL", name, f"did not end within {BOUND_S:.0f} s (a hang)")
        else:
            verdict, detail = outcome[0]
            self.line(verdict, name, detail)


# -- the models ------------------------------------------------------------------------------


def reference_models() -> dict[str, tuple[str, dict[str, Any], Any]]:
    """name -> (factory, config, example input): the tiny reference models of cloud/models."""
    out = {}
    for name in ("gpt2", "bert", "resnet"):
        module = importlib.import_module(f"cicada.cloud.models.{name}")
        config = module.tiny_config()
        kwargs = {"size": 32} if name == "resnet" else {}
        out[name] = (
            f"cicada.cloud.models.{name}:build",
            config,
            module.example_input(config, **kwargs),
        )
    return out


def transformers_bert() -> tuple[str, dict[str, Any], Any, Any] | None:
    """(factory, config, example input, the eager model) for a tiny transformers BertModel, or
    None where transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch

    from cicada.cloud import hub
    from cicada.cloud.models import bert

    config = bert.tiny_config()  # the reference BERT's keys are transformers' own
    spec = hub.transformers_spec("BertModel", config, output=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hub.transformers_model(**spec)
    x = bert.example_input(config)
    return hub.TRANSFORMERS_FACTORY, spec, x, model


# -- the checks ------------------------------------------------------------------------------


def loader_sources(device: str) -> dict[str, Any]:
    """label -> the `source` argument of ColdStart for each loader checked on `device`."""
    from cicada.cloud.loading.cpu import CpuStageSource
    from cicada.cloud.loading.cuda import CudaStageSource
    from cicada.cloud.loading.simulated import SimulatedCuda

    if device.startswith("cuda"):
        return {"cuda-loader": CudaStageSource}
    return {
        "cuda-loader(simulated device)": CudaStageSource.using(lambda _d: SimulatedCuda()),
        "cpu-loader": CpuStageSource,
    }


def readers_source(device: str) -> Any:
    """The CUDA source cutting stages into 12 KiB pieces (several per stage of the tiny
    models), on the real device or the simulated one."""
    from cicada.cloud.loading.cuda import CudaBackend, CudaStageSource
    from cicada.cloud.loading.simulated import SimulatedCuda

    backend = CudaBackend if device.startswith("cuda") else (lambda _d: SimulatedCuda())
    return CudaStageSource.using(backend, chunk_bytes=3 * 4096)


def bit_identity(
    package: Path, device: str, source: Any, x: Any, eager: Any, trusted: bool = False,
    readers: int | None = None,
) -> str:  # fmt: skip
    import torch

    from cicada.cloud.pipeline import ColdStart

    start = time.perf_counter()
    cold = ColdStart(package, device=device, source=source, stall_timeout=BOUND_S / 2,
                     trust_package_code=trusted, reader_threads=readers)  # fmt: skip
    out = cold.forward(x.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    took = time.perf_counter() - start
    with torch.inference_mode():
        expected = eager.to(device)(x.to(device))
    assert torch.equal(out, expected), (
        f"differs from eager: max |diff| {(out.float() - expected.float()).abs().max().item():.3g}"
    )
    return f"bit-identical to eager, first result in {took:.3f} s"


def expect_error(package: Path, device: str, source: Any, x: Any, match: str) -> str:
    """The cold start must fail with a CicadaError whose message holds `match`."""
    from cicada.cloud.pipeline import ColdStart
    from cicada.common.errors import CicadaError, LoadStalledError

    start = time.perf_counter()
    cold = ColdStart(package, device=device, source=source, stall_timeout=BOUND_S / 2)
    try:
        cold.forward(x.to(device))
    except LoadStalledError as exc:
        raise AssertionError(f"only the stall bound ended it: {exc}") from None
    except CicadaError as exc:
        assert match in str(exc), f"unexpected error: {exc}"
        took = time.perf_counter() - start
        # The failed load's threads end too (one inside a torch op at exit aborts the script).
        assert cold.join_loader(BOUND_S / 2), "the failed load's threads are still running"
        return f"{type(exc).__name__} after {took:.3f} s"
    raise AssertionError("the load succeeded")


def corrupt(package: Path, out: Path, at: int | None = None) -> Path:
    """A copy of `package` with one byte flipped (its manifest untouched): byte `at`, by
    default the first of stage 1."""
    import shutil

    from cicada.common.package import WEIGHTS_NAME, Manifest

    shutil.copytree(package, out)
    if at is None:
        at = Manifest.load(out).stages[1].begin
    with open(out / WEIGHTS_NAME, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return out


def failing_source(device: str) -> Any:
    """The CUDA source on a backend whose second copy raises (a size mismatch, a launch
    error), on the real device or the simulated one."""
    from cicada.cloud.loading.cuda import CudaBackend, CudaStageSource
    from cicada.cloud.loading.simulated import SimulatedCuda

    if not device.startswith("cuda"):
        return CudaStageSource.using(lambda _d: SimulatedCuda(fail_copy=2))

    class FailingBackend(CudaBackend):
        copies = 0

        def copy(self, stream: Any, dst: Any, src: Any) -> None:
            self.copies += 1
            if self.copies == 2:
                raise RuntimeError("injected: the copy failed")
            super().copy(stream, dst, src)

    return CudaStageSource.using(FailingBackend)


def correctness(report: Report, device: str, work: Path) -> None:
    from cicada.cloud.packing import pack
    from cicada.common.package import Manifest

    for name, (factory, config, x) in reference_models().items():
        package = work / name
        pack(factory, package, config=config)
        eager = importlib.import_module(factory.partition(":")[0]).build(**config)
        for label, source in loader_sources(device).items():
            run = partial(bit_identity, package, device, source, x, eager)
            report.check(f"bit-identity {name} {label}", run)
    hf = transformers_bert()
    if hf is None:
        report.line("SKIP", "bit-identity transformers BertModel", "transformers not installed")
    else:
        factory, spec, x, model = hf
        pack(factory, work / "hf-bert", config=spec, model=model)
        for label, source in loader_sources(device).items():
            run = partial(bit_identity, work / "hf-bert", device, source, x, model)
            report.check(f"bit-identity transformers BertModel {label}", run)
    factory, config, x = reference_models()["gpt2"]
    eager = importlib.import_module(factory.partition(":")[0]).build(**config)
    blocks = work / "gpt2-blocks"
    pack(factory, blocks, config=config, block_bytes=4096)
    readers = readers_source(device)
    run = partial(bit_identity, blocks, device, readers, x, eager, readers=3)
    report.check("bit-identity gpt2 cuda-loader, 3 readers, 4 KiB block sums", run)
    stage = Manifest.load(blocks).stages[2]
    bad_block = corrupt(blocks, work / "gpt2-bad-block", at=stage.begin + 5 * 4096 + 3)
    match = f"stage 2 ({stage.name}) block 5 "
    run = partial(expect_error, bad_block, device, readers, x, match)
    report.check("corrupt block names its stage and block cuda-loader", run)
    bad = corrupt(work / "gpt2", work / "gpt2-corrupt")
    for label, source in loader_sources(device).items():
        run = partial(expect_error, bad, device, source, x, "the file is corrupt")
        report.check(f"corrupt stage ends in an error {label}", run)
    injected = "injected" if device.startswith("cuda") else "simulated"
    run = partial(expect_error, work / "gpt2", device, failing_source(device), x, injected)
    report.check("injected loader error ends in an error", run)


# -- GPU only: NOT YET RUN ON A GPU ----------------------------------------------------------


def gpu_bandwidth(report: Report, device: str, gib: float) -> float | None:
    """Pinned host-to-device bandwidth, bytes/s (median of 5 copies of `gib` GiB).
    NOT YET RUN ON A GPU."""
    import torch

    nbytes = int(gib * 2**30)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(6):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(nbytes / (begin.elapsed_time(end) / 1e3))
    rate = statistics.median(rates[1:])  # the first warms the path
    del host, dev
    report.figures["pinned_h2d_gb_s"] = rate / 1e9
    report.line("PASS", "pinned H2D bandwidth", f"{rate / 1e9:.1f} GB/s ({gib:g} GiB copies)")
    return rate


def read_bandwidth(report: Report, path: Path, readers: int) -> float:
    """The weights file's read bandwidth, bytes/s: `readers` threads with `os.preadv` of
    64 MiB pieces into reused buffers (no hashing), page cache warm (read once before), the
    best of 3. NOT YET RUN ON A GPU machine."""
    size = path.stat().st_size
    piece = 64 * 2**20
    path.read_bytes()  # warm

    def read(k: int, buf: memoryview) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for at in range(k * piece, size, readers * piece):
                n = min(piece, size - at)
                got = 0
                while got < n:
                    got += os.preadv(fd, [buf[got:n]], at + got)
        finally:
            os.close(fd)

    buffers = [memoryview(bytearray(piece)) for _ in range(readers)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        threads = [threading.Thread(target=read, args=(k, buffers[k])) for k in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    rate = size / best
    report.figures["read_gb_s"] = rate / 1e9
    report.line("PASS", "read bandwidth", f"{rate / 1e9:.1f} GB/s ({readers} threads, page "
                f"cache warm, {size / 1e9:.2f} GB)")  # fmt: skip
    return rate


def gpu_strategies(report: Report, package: Path) -> list[str]:
    """Every strategy that runs on CUDA: the built-in ones, and each peer whose library is
    installed (its one-time preparation done here, outside any timed run); a peer that is not
    installed is a SKIP line naming what to install."""
    from cicada.cloud.loading.registry import get_strategy, optional_libraries, strategy_names

    libraries = optional_libraries()
    names = []
    for name in strategy_names():
        loader = get_strategy(name)
        if loader.devices is not None and "cuda" not in loader.devices:
            continue
        if name in libraries:
            module, pip = libraries[name]
            if importlib.util.find_spec(module) is None:
                report.line("SKIP", f"cold start {name}", f"{module} is not installed "
                            f"(pip install {pip}, or the bench extra)")  # fmt: skip
                continue
            loader.prepare(package)
        names.append(name)
    return names


def fresh_run(
    package: Path, inputs: Path, strategy: str, device: str, work: Path
) -> dict[str, Any]:
    """One `python -m cicada run --device DEVICE` in a fresh process; its timings."""
    tag = f"{strategy}-{time.monotonic_ns()}"
    timings = work / f"{tag}.json"
    cmd = [sys.executable, "-m", "cicada", "run", str(package), "--input", str(inputs),
           "--strategy", strategy, "--device", device, "--timings", str(timings)]  # fmt: skip
    env = dict(os.environ, CICADA_LAUNCH_TIME=repr(time.time()))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return dict(json.loads(timings.read_text()))


def gpu_cold_starts(report: Report, device: str, h2d_bps: float, quick: bool, work: Path) -> None:
    """A multi-GB package cold-started in fresh processes by every strategy that runs on
    CUDA: time to first result, load GB/s, and cicada's ratio to the floor.
    NOT YET RUN ON A GPU."""
    import numpy as np

    from benchmarks.cold_start import time_torch_import
    from cicada.cloud.loading.cuda import default_readers
    from cicada.cloud.packing import pack

    layers, width, heads = (24, 1024, 16) if quick else (48, 1600, 25)  # ~1.4 GB / ~6 GB fp32
    config = {"n_layer": layers, "n_embd": width, "n_head": heads}
    package = work / "big"
    pack("cicada.cloud.models.gpt2:build", package, config=config)
    inputs = work / "big-x.npy"
    np.save(inputs, np.arange(32, dtype=np.int64).reshape(1, 32) % 50257)
    weights = package / "weights.safetensors"
    nbytes = weights.stat().st_size
    read_bps = read_bandwidth(report, weights, default_readers())
    link_bps = min(read_bps, h2d_bps)  # what the load can reach at best
    import_s = statistics.median(time_torch_import()[0] for _ in range(3))
    strategies = gpu_strategies(report, package)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for _ in range(1 if quick else 3):
        for s in strategies:  # interleaved: noise spreads over every strategy
            try:
                runs[s].append(fresh_run(package, inputs, s, device, work))
            except Exception as exc:
                report.line("FAIL", f"cold start {s}", str(exc))
    first_results: dict[str, float] = {}
    for s, done in runs.items():
        if not done:
            continue
        first = statistics.median(r["time_to_first_result_s"] for r in done)
        first_results[s] = first
        rate = nbytes / 1e9 / first
        report.line("PASS", f"cold start {s}", f"first result {first:.2f} s, load {rate:.2f} GB/s")
    cicada = runs.get("cicada") or []
    if cicada:
        construct = statistics.median(r["construct_s"] for r in cicada)
        last = statistics.median(r["last_stage_compute_s"] or 0.0 for r in cicada)
        ours = first_results["cicada"]
        floor = max(import_s, nbytes / link_bps) + construct + last
        ratio = ours / floor
        report.figures.update(floor_s=floor, cicada_ratio=ratio, first_result_s=first_results)
        report.line("PASS" if ratio <= 1.2 else "FAIL", "cicada vs floor",
                    f"{ratio:.2f} x floor {floor:.2f} s (target <= 1.2)")  # fmt: skip
        # The link's share: first copy enqueued -> last stage resident (the "transfer" lane).
        transfer = statistics.median(r.get("transfer_s") or float("inf") for r in cicada)
        share = nbytes / transfer / link_bps
        report.figures.update(transfer_gb_s=nbytes / transfer / 1e9, link_share=share)
        report.line("PASS" if share >= 0.8 else "FAIL", "cicada load rate vs the link",
                    f"{nbytes / transfer / 1e9:.1f} GB/s = {share:.0%} of min(H2D "
                    f"{h2d_bps / 1e9:.1f}, read {read_bps / 1e9:.1f}) GB/s "
                    "(target >= 80 %)")  # fmt: skip
        as_fast = [s for s, t in first_results.items() if s != "cicada" and t <= ours]
        report.line("FAIL" if as_fast else "PASS", "cicada faster than every other strategy",
                    ", ".join(as_fast) or f"{len(first_results) - 1} others slower")  # fmt: skip
        peers = [s for s in first_results if s.startswith("peer-")]
        report.line("PASS" if peers and not set(peers) & set(as_fast) else
                    "SKIP" if not peers else "FAIL", "cicada faster than every GPU peer",
                    ", ".join(f"{p} {first_results[p] / ours:.2f} x cicada's time"
                              for p in peers) or "no peer installed")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    p.add_argument("--quick", action="store_true", help="small models and packages only")
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    report = Report()
    gpu = args.device.startswith("cuda")
    import torch

    if gpu and not torch.cuda.is_available():
        report.line("FAIL", "device", f"{args.device} asked for, but torch sees no CUDA device")
        return 1
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name(args.device)})" if gpu
          else " (dry run: the CUDA loader runs over a simulated device)"), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cicada-gpu-check-") as tmp:
        work = Path(tmp)
        correctness(report, args.device, work)
        if gpu:  # NOT YET RUN ON A GPU
            h2d = gpu_bandwidth(report, args.device, 1.0)
            if h2d is not None:
                gpu_cold_starts(report, args.device, h2d, args.quick, work)
        else:
            for what in ("pinned H2D bandwidth", "multi-GB cold starts"):
                report.line("SKIP", what, "needs --device cuda")
    if args.json is not None:
        args.json.write_text(json.dumps(report.figures, indent=2))
    print(f"{'FAIL' if report.failed else 'PASS'} gpu_check: {report.failed} check(s) failed",
          flush=True)  # fmt: skip
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
