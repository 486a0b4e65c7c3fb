#!/usr/bin/env python3
"""Warm pool and a transformers package: first answer from a fork, with and without preload.

    python3 -m benchmarks.pool_preload            # 3 interleaved runs of each
    python3 -m benchmarks.pool_preload --runs 5

Packs a GPT2LMHeadModel (4 layers, 256 wide, random weights) with `cicada pack --transformers`
once, then per run starts a warm pool (`cicada pool`, torch imported) with or without
`--preload` of that package, and times on this process: launch request -> the fork registers
with a stand-in coordinator (a bare ROUTER) -> its RESULT for one forward. The pool's own
start-up is not timed (it happens before demand). The difference is what a forked worker
pays to import transformers and the model's modeling code. Runs alternate the two modes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cicada.common.launch import PoolLauncher, WorkerSpec
from cicada.common.protocol import Dispatch, Ready, Result, Status
from cicada.testing import StandInCoordinator


def make_package(work: Path) -> Path:
    import transformers
    from click.testing import CliRunner

    from cicada.cli import main as cli

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4))
    model.save_pretrained(work / "dir")
    package = work / "pkg"
    done = CliRunner().invoke(cli, ["pack", "--transformers", str(work / "dir"), "--out",
                                    str(package)])  # fmt: skip
    if done.exit_code != 0:
        raise SystemExit(f"cicada pack failed: {done.output}")
    return package


def first_answer_s(work: Path, package: Path, preload: bool, name: str) -> float:
    preloads = [str(package)] if preload else []
    launcher = PoolLauncher(str(work / f"{name}.sock"), preload=preloads).start(timeout=120)
    coordinator = StandInCoordinator()
    try:
        start = time.monotonic()
        launcher.launch(WorkerSpec(model="m", package=str(package), name=name, heartbeat=0.1,
                                   coordinator=f"tcp://127.0.0.1:{coordinator.port}"))  # fmt: skip
        until = start + 120
        coordinator.expect(Ready, until)
        x = np.arange(16, dtype=np.int64)[None]
        coordinator.send(Dispatch(id="d", model="m", inputs=[x]))
        result = coordinator.expect(Result, until, where=lambda m: m.id == "d")
        if result.status is not Status.OK:
            raise SystemExit(f"the worker failed: {result.error}")
        return time.monotonic() - start
    finally:
        coordinator.close()
        launcher.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    opts = ap.parse_args()
    times: dict[str, list[float]] = {"no preload": [], "preload": []}
    with tempfile.TemporaryDirectory(prefix="cicada-preload-") as tmp:
        work = Path(tmp)
        package = make_package(work)
        for i in range(opts.runs):
            for mode in times:
                s = first_answer_s(work, package, mode == "preload", f"w{i}-{len(times[mode])}"
                                   + mode.replace(" ", "-"))  # fmt: skip
                times[mode].append(s)
                print(f"run {i} {mode}: {s:.3f} s", flush=True)
    med = {mode: statistics.median(v) for mode, v in times.items()}
    print({mode: round(v, 3) for mode, v in med.items()},
          f"saved {med['no preload'] - med['preload']:.3f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
