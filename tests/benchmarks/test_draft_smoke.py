"""Smoke test for the draft benchmark (`python3 -m benchmarks.draft --quick`).

No timing is asserted: the run must finish, its last line must be the JSON object with every
figure, speculative decoding must have given the cloud alone's tokens bit for bit, and the
full-depth int8 draft must agree with the cloud model more often than the truncated one (the
tiny 4-layer model measured 0.94 against 0.33 on this CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.run import run_benchmark


@pytest.mark.slow  # a whole quick benchmark run: pack, two exports, decodes (~30 s of CPU)
def test_quick_draft_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "draft"
    last = run_benchmark(["-m", "benchmarks.draft", "--quick", "--out", str(out)], 900)
    assert last["bit_identical"] is True
    assert set(last["agreement"]) == {"full", "cut"}
    assert last["agreement"]["full"] > last["agreement"]["cut"]
    for key in ("cloud_alone_tokens_per_s", "speculative_tokens_per_s", "speedup_sequential",
                "speedup_cloud_only", "tokens_per_cloud_forward"):  # fmt: skip
        assert last[key] > 0, key
    assert 0 <= last["acceptance_rate"] <= 1
    assert all(v > 0 for k in ("full", "cut") for v in last["draft_tokens_per_s"][k].values())
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["cpu_count"] >= 1
    assert results["runs"][0]["drafted"] >= results["runs"][0]["accepted"]
