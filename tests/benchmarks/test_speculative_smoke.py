"""Smoke test for the drafting benchmark (`python3 -m benchmarks.speculative --quick`).

No timing is asserted: the run must finish, its last line must be the JSON object with every
figure the issue names, the exact run must equal the cloud model's eager greedy decode (and so
must cloud-only's), the cloud must have taken it over and verified drafts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cicada.cloud import few_rows
from tests.benchmarks.run import run_benchmark


@pytest.mark.slow  # three cold stacks, a pack and an export (about a minute of a quiet CPU)
def test_quick_speculative_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "speculative"
    # --row-invariant always: the cloud worker (one thread when pinned) verifies on the
    # row-invariant kernel, so its verify forwards are its one-token steps and nothing replays.
    last = run_benchmark(["-m", "benchmarks.speculative", "--quick", "--out", str(out),
                          "--row-invariant", "always"], 900)  # fmt: skip
    assert last["runs"] == 1
    assert last["exact_matches"] == 1, "bit for bit the cloud model's greedy decode"
    assert last["cloud_only_matches"] == 1 and last["taken_over"] == 1
    for key in ("edge_ttft_s", "exact_ttft_s", "exact_result_s", "cloud_only_result_s",
                "drafted_tokens_per_s", "cloud_alone_tokens_per_s",
                "handoff_result_s"):  # fmt: skip
        assert last[key] > 0, key
    assert last["edge_ttft_s"] < last["exact_ttft_s"] <= last["exact_result_s"]
    assert 0 <= last["acceptance"] <= 1 and last["accepted"] <= last["drafted"]
    assert last["rewound"] >= 0
    assert last["row_invariant"] == "always"
    if few_rows.onednn_available():
        assert last["rows_exact"] is True and last["replayed"] == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]["exact"]) == 1 and results["machine"]
    if last["pinned"]:  # the cloud has one thread: cloud-only also ran on MKL's decode (auto)
        assert len(results["runs"]["cloud_only_auto"]) == 1
        assert last["cloud_alone_auto_tokens_per_s"] > 0 and last["speedup_vs_fastest_alone"] > 0
