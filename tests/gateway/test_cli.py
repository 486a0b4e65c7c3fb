"""`cicada gateway` refusing to start, each in one line that names the option, exiting
non-zero: a busy port, a public address without --insecure, a malformed endpoint, a package
directory that is not one."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cicada.testing import ROOT


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cicada", "gateway", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_busy_port_is_one_line_naming_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _gateway("--listen", f"127.0.0.1:{port}")
    assert done.returncode != 0
    assert f"--listen 127.0.0.1:{port}: cannot bind" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listen", "0.0.0.0:8000"], "--insecure"),
        (["--listen", "8000"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:5555"], "--coordinator"),
        (["--package", "gpt2"], "NAME=DIR"),
    ],
)
def test_usage_errors(args: list[str], says: str) -> None:
    done = _gateway(*args)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_a_directory_that_is_no_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "edge_model.json").write_text("[1, 2")
    done = _gateway("--package", f"m={tmp_path}", "--listen", "127.0.0.1:0")
    assert done.returncode == 1 and "edge_model.json is not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_tokenizer_linking_out_of_its_directory_is_refused(tmp_path: Path) -> None:
    from tests.gateway.assets import write_embedding_model

    model = write_embedding_model(tmp_path / "emb")
    outside = tmp_path / "outside.json"
    (model / "tokenizer.json").rename(outside)
    (model / "tokenizer.json").symlink_to(outside)
    done = _gateway("--package", f"emb={model}", "--listen", "127.0.0.1:0")
    assert done.returncode == 1 and "outside the package" in done.stderr


def test_the_gateway_never_imports_torch() -> None:
    code = (
        "import sys, cicada.cli.gateway, cicada.gateway.app, cicada.gateway.openai_api, "
        "cicada.gateway.kserve, cicada.gateway.models, cicada.gateway.text; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
