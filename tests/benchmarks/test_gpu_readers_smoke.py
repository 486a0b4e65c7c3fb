"""Smoke test for benchmarks/gpu_readers.py (`--quick`, one round): it runs to the end and its
last line is the JSON object it documents, with a positive rate for every variant and the
import probe's figures. How much the readers got through during the import is a race with
it, so it is only bounded here; that they read before the model is built is tested without
a race in tests/cloud/test_gpu_readers.py. No timing is asserted."""

from __future__ import annotations

from tests.benchmarks.run import run_benchmark


def test_quick_gpu_readers_benchmark() -> None:
    last = run_benchmark(
        ["benchmarks/gpu_readers.py", "--quick", "--rounds", "1", "--readers", "1,2"], 600
    )
    assert set(last["gb_s"]) == {
        "single loop", "read only (1 thread, no hash)", "ring, 1 reader", "ring, 2 readers",
    }  # fmt: skip
    assert all(rate > 0 for rate in last["gb_s"].values())
    probe = last["import_probe"]
    assert 0 <= probe["ready_bytes"] <= min(last["bytes"], probe["ring_bytes"])
    assert probe["ring_bytes"] > 0 and probe["import_s"] > 0
    assert set(last["first_result_s"]) == {"before", "after"}
    assert all(t > 0 for t in last["first_result_s"].values())
