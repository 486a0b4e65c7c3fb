"""Running a benchmark as its users do, for the smoke tests: a fresh process from the
repository root, which must exit 0 and end its output with one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(args: list[str], timeout: float) -> dict[str, Any]:
    """`python <args>` (e.g. ["-m", "benchmarks.draft", "--quick"]) in ROOT; its output's last
    line, parsed. A non-zero exit fails the test with the output's tail."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return last
