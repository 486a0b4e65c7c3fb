"""One import root: installed, Cicada is `cicada` alone (`cicada.common`, `cicada.cloud`,
`cicada.edge`), no module loads under two names, and `import cicada` stays torch-free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.common.factory import canonical_factory
from cicada.common.package import MANIFEST_NAME, WEIGHTS_NAME, Manifest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_the_wheel_installs_cicada_alone(tmp_path: Path) -> None:
    # Build from a copy of the tracked files (links kept as links): an in-tree build would
    # leave build/ behind, and the wheel must not depend on what else lies in the checkout.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, tracked):
        origin, copy = ROOT / name, source / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            copy.symlink_to(os.readlink(origin))
        elif origin.is_file():
            shutil.copy2(origin, copy)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("cicada-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["cicada"]
    roots = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(
        ".dist-info")}  # fmt: skip
    assert roots == {"cicada"}
    # The role folders travel as real files under the one root, not as links.
    for module in ("cicada/common/protocol.py", "cicada/cloud/pipeline.py", "cicada/edge/agent.py",
                   "cicada/cloud/models/gpt2.py"):  # fmt: skip
        assert module in names


@pytest.mark.parametrize("name", ["common", "cloud", "edge", "common.protocol", "edge.agent"])
def test_a_role_never_imports_under_its_bare_name(name: str, tmp_path: Path) -> None:
    # From the repository root the folder is on sys.path: the guard refuses the second name.
    done = _python(f"import {name}", ROOT)
    assert done.returncode != 0
    assert f"import this package as 'cicada.{name.split('.')[0]}'" in done.stderr
    # From anywhere else (as installed: no PYTHONPATH into the tree) there is nothing by that name.
    installed = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _python(f"import {name}", tmp_path, installed)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_import_cicada_and_the_client_stay_torch_free(tmp_path: Path) -> None:
    done = _python(
        "import sys, cicada; from cicada import Client, AsyncClient; import cicada.errors; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(cicada.__file__)",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve().is_relative_to(ROOT)


def test_factory_names_of_older_packages_are_mapped() -> None:
    assert canonical_factory("cloud.models.gpt2:build") == "cicada.cloud.models.gpt2:build"
    assert canonical_factory("cloud.hub:torchvision_model") == "cicada.cloud.hub:torchvision_model"
    assert canonical_factory("cicada.cloud.models.gpt2:build") == "cicada.cloud.models.gpt2:build"
    assert canonical_factory("mypkg.cloud:build") == "mypkg.cloud:build"
    assert canonical_factory("cloudy.models:build") == "cloudy.models:build"


def test_a_package_written_before_the_one_root_still_loads(tmp_path: Path) -> None:
    config = gpt2.tiny_config()
    package = tmp_path / "old"
    pack("cicada.cloud.models.gpt2:build", package, config=config)
    doc = json.loads((package / MANIFEST_NAME).read_text())
    doc["architecture"]["factory"] = "cloud.models.gpt2:build"  # as 0.1.0 wrote it
    del doc["manifest_sha256"]  # 0.1.0 did not seal its manifests: loaded with a warning
    (package / MANIFEST_NAME).write_text(json.dumps(doc))
    assert Manifest.load(package).architecture.factory == "cicada.cloud.models.gpt2:build"

    ids = gpt2.example_input(config)
    cold = ColdStart(package)
    cold.build()
    torch.manual_seed(0)
    eager = gpt2.build(**config)
    eager.load_state_dict(load_file(package / WEIGHTS_NAME), strict=False)  # ties: constructor
    with torch.no_grad():
        assert torch.equal(cold.forward(ids), eager(ids))
