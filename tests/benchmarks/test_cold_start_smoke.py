"""Smoke tests for the cold-start benchmark and the peer loaders it runs.

No timing is asserted anywhere: these machines are noisy. The benchmark must run end to end,
write its results and chart, and every peer loader must give the same bits as cicada.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cicada.cloud.loading.registry import builtin_strategies, get_strategy, optional_libraries
from cicada.demos.cold_start import REFERENCE_MODELS, example_input

ROOT = Path(__file__).resolve().parents[2]
BASE_STRATEGIES = list(builtin_strategies())
PEERS = {strategy: module for strategy, (module, _) in optional_libraries().items()}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _installed_peers() -> list[str]:
    return [s for s, module in PEERS.items() if importlib.util.find_spec(module) is not None]


@pytest.mark.slow  # a whole quick benchmark run (~35 s)
def test_quick_benchmark_writes_results_and_gantt(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ, CICADA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    requested = BASE_STRATEGIES + _installed_peers()
    assert results["config"]["strategies"] == requested
    warm = results["models"]["gpt2-tiny"]["cache"]["warm"]
    for strategy in requested:
        summary = warm["strategies"][strategy]
        assert summary["failed"] == 0, strategy
        assert summary["time_to_first_result_s"] > 0, strategy
        assert summary["outputs_match_cicada"], strategy
    runs = [r for r in results["runs"] if "error" not in r]
    assert {r["strategy"] for r in runs} == set(requested)
    assert all(r["time_to_first_result_s"] > 0 for r in runs)

    floor = warm["floor"]
    for part in ("python_start_s", "torch_import_s", "read_s", "last_stage_compute_s"):
        assert floor[part] > 0, part
    assert floor["total_s"] > 0
    assert results["machine"]["cpu_count"] >= 1
    assert results["utilization_definition"]

    gantt = out / "gantt-gpt2-tiny-warm.png"
    assert gantt.exists()
    assert gantt.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """gpt2-tiny packed, its example input, and cicada's output on it (the reference)."""
    from cicada.cloud.packing import pack

    work = tmp_path_factory.mktemp("peers")
    factory, config = REFERENCE_MODELS["gpt2-tiny"]
    pack(factory, work / "pkg", config=config)
    inputs = example_input("gpt2-tiny", work / "x.npy")
    reference = _cold_start(work / "pkg", inputs, "cicada", work / "cicada.npy")
    return work / "pkg", inputs, reference


def _cold_start(package: Path, inputs: Path, strategy: str, out: Path) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "cicada", "run", str(package), "--input", str(inputs),
         "--strategy", strategy, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(out)


@pytest.mark.parametrize("strategy", list(PEERS))
def test_peer_output_is_bit_identical_to_cicada(
    tiny_package: tuple[Path, Path, Any], strategy: str
) -> None:
    pytest.importorskip(PEERS[strategy], reason=f"{strategy} needs the `bench` extra")
    package, inputs, reference = tiny_package
    get_strategy(strategy).prepare(package)
    got = _cold_start(package, inputs, strategy, package.parent / f"{strategy}.npy")
    assert got.dtype == reference.dtype and got.shape == reference.shape
    assert np.array_equal(got, reference)


def test_peer_loader_without_its_file_says_how_to_make_it(
    tiny_package: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    pytest.importorskip("tensorizer", reason="peer-tensorizer needs the `bench` extra")
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(tiny_package[0], package, ignore=shutil.ignore_patterns("peers"))
    proc = subprocess.run(
        [sys.executable, "-m", "cicada", "run", str(package), "--input", str(tiny_package[1]),
         "--strategy", "peer-tensorizer"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "prepare_tensorizer" in proc.stderr
