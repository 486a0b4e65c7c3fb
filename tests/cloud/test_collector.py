"""The garbage collector stays out of a cold start's import and construction (cloud/collector.py):
read from the spans the runtime records on its "gc" lane, never from timings."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada.cloud import collector
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.cloud.timeline import Timeline

ROOT = Path(__file__).resolve().parents[2]


def _gpt2(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    module = importlib.import_module("cicada.cloud.models.gpt2")
    config = module.tiny_config()
    pack("cicada.cloud.models.gpt2:build", tmp_path / "pkg", config=config)
    return tmp_path / "pkg", module.example_input(config)


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.fixture
def eager_collector() -> Iterator[None]:
    """A collector that fires a full collection every few allocations; this process's objects
    frozen so that each one is cheap. Everything restored afterwards."""
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    gc.freeze()
    # A full collection now counts the long-lived objects as none (all are frozen): CPython
    # runs a full one only once the pending objects exceed a quarter of that count, which
    # after earlier tests in this process (millions of objects) no test here would reach.
    gc.collect()
    gc.enable()
    gc.set_threshold(20, 1, 1)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        if not enabled:
            gc.disable()


@pytest.mark.usefixtures("eager_collector")
def test_no_collection_fires_inside_the_construct_span(tmp_path: Path) -> None:
    package, example = _gpt2(tmp_path)
    timeline = Timeline()
    stop = collector.record_collections(timeline)
    try:
        cold = ColdStart(package, timeline=timeline)
        cold.build()
        cold.forward(example)
    finally:
        stop()
    (construct,) = [(s.start, s.end) for s in timeline.spans if s.lane == "construct"]
    gcs = [(s.start, s.end) for s in timeline.spans if s.lane == collector.GC_LANE]
    full = collector.full_collections(timeline)
    # The collector was busy (full collections too) all around construction, never inside it.
    assert full, "the recorder saw no full collection: the test proves nothing"
    assert not [g for g in gcs if _overlaps(g, construct)]
    assert gc.isenabled()  # and it is back on afterwards


def test_quiet_import_pauses_then_freezes_and_restores() -> None:
    frozen = gc.get_freeze_count()
    try:
        with collector.quiet_import():
            assert not gc.isenabled()
            made = [[i] for i in range(100)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()  # as it was, not switched on behind the caller's back
    finally:
        gc.enable()


def test_a_fresh_cold_start_records_no_collection_in_its_import_or_construct(
    tmp_path: Path,
) -> None:
    """`cicada run` in a fresh process: `import torch` alone sets off collections of every
    generation when the collector is on; the runtime's gc lane must show none in there."""
    package, example = _gpt2(tmp_path)
    np.save(tmp_path / "x.npy", example.numpy())
    timings = tmp_path / "t.json"
    subprocess.run(
        [sys.executable, "-m", "cicada", "run", str(package), "--input", str(tmp_path / "x.npy"),
         "--strategy", "cicada", "--timings", str(timings)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    record = json.loads(timings.read_text())
    spans = [(s["lane"], s["label"], s["start"], s["end"]) for s in record["spans"]]
    quiet = [(a, b) for lane, label, a, b in spans if (lane, label) == ("import", "torch")]
    quiet += [(a, b) for lane, _, a, b in spans if lane == "construct"]
    assert len(quiet) == 2
    gcs = [(a, b) for lane, _, a, b in spans if lane == collector.GC_LANE]
    assert not [g for g in gcs for q in quiet if _overlaps(g, q)]
    assert record["minor_faults"]["import"] > 0
