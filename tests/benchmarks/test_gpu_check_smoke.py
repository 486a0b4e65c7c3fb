"""Smoke test for benchmarks/gpu_check.py's CPU dry run: every check that applies on CPU
passes (bit-identity of the CUDA loader over a simulated device, with 3 parallel readers too,
and of the CPU loader, a corrupt stage, a corrupt block and an injected loader error ending in
errors), the GPU-only ones are skipped by name, and the script exits 0. No timing is
asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_dry_run_passes_every_check_that_applies(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
         "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    for model in ("gpt2", "bert", "resnet"):
        assert any(line.startswith(f"PASS bit-identity {model} cuda-loader") for line in lines)
    assert any(line.startswith("PASS corrupt stage ends in an error cuda-loader") for line in lines)
    assert any(line.startswith("PASS injected loader error ends in an error") for line in lines)
    # The parallel readers and block checksums are exercised by the dry run too.
    assert any(line.startswith("PASS bit-identity gpt2 cuda-loader, 3 readers") for line in lines)
    assert any(line.startswith("PASS corrupt block names its stage and block") for line in lines)
    assert "SKIP pinned H2D bandwidth: needs --device cuda" in lines
    assert lines[-1].startswith("PASS gpu_check")
    assert json.loads(figures.read_text()) == {}  # no GPU figures from a dry run
