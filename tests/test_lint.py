"""The project's own checks, run as tests so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_edge_and_common_never_import_torch() -> None:
    """The edge side runs on devices without torch; common is shared with it."""
    code = (
        "import sys, cicada, cicada.common.package, cicada.common.errors, cicada.common.protocol, "
        "cicada.common.worker, cicada.common.factory, cicada.common.edge_model, "
        "cicada.common.files, cicada.common.inputs, cicada.common.defaults, "
        "cicada.cloud.loading.registry, cicada.cloud.loading.cuda, cicada.cloud.runner, "
        "cicada.cloud.timeline, cicada.edge.agent, cicada.edge.coordinator, "
        "cicada.edge.coordinator.broker, cicada.edge.coordinator.lifecycle, "
        "cicada.edge.coordinator.config, cicada.edge.onnx_model, cicada.edge.coordinator.status, "
        "cicada.client, cicada.cli; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
