"""Stage detection (cloud/stages.py) on real modules, and each detected package served by a
fresh `cicada run` process bit-identically to eager PyTorch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cicada.cloud.miniloader import build_model
from cicada.cloud.models import bert, gpt2, resnet
from cicada.cloud.packing import pack
from cicada.cloud.stages import plan_stages
from cicada.common.errors import StagingError
from cicada.common.factory import trust_package_code
from cicada.common.package import Manifest
from tests.cloud import toy_models

ROOT = Path(__file__).resolve().parents[2]
TOY = "tests.cloud.toy_models"


@dataclass(frozen=True)
class Case:
    factory: str
    config: dict[str, Any]
    make_input: Callable[[], torch.Tensor]
    method: str
    stages: list[str]
    modules: list[list[str]] = field(default_factory=list)  # checked when given


CASES: dict[str, Case] = {
    "sequential": Case(
        f"{TOY}:build_mlp",
        {"width": 16},
        toy_models.example_input,
        "sequential",
        ["0", "2", "4"],
        [["0"], ["2"], ["4"]],
    ),
    "gpt2": Case(
        "cicada.cloud.models.gpt2:build",
        gpt2.tiny_config(),
        lambda: gpt2.example_input(gpt2.tiny_config(), batch=2),
        "blocks",
        ["pre", "transformer.h.0", "transformer.h.1", "post"],
        [
            ["transformer.wte", "transformer.wpe"],
            ["transformer.h.0"],
            ["transformer.h.1"],
            ["transformer.ln_f"],
        ],
    ),
    "bert": Case(
        "cicada.cloud.models.bert:build",
        bert.tiny_config(),
        lambda: bert.example_input(bert.tiny_config(), batch=2),
        "blocks",
        ["pre", "layers.0", "layers.1", "post"],
    ),
    "resnet": Case(
        "cicada.cloud.models.resnet:build",
        resnet.tiny_config(),
        lambda: resnet.example_input(resnet.tiny_config(), batch=2, size=32),
        "children",
        ["stem", "layer1", "layer2", "layer3", "layer4", "fc"],
        [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]],
    ),
    "declared": Case(
        f"{TOY}:build_declared",
        {"width": 16},
        toy_models.example_input,
        "declared",
        ["front", "back"],
        [["embed", "body"], ["head"]],
    ),
    "whole": Case(
        f"{TOY}:build_flat",
        {"width": 16},
        toy_models.example_input,
        "whole",
        ["whole"],
        [[""]],
    ),
}
cases = pytest.mark.parametrize("case_id", list(CASES))

_packed: dict[str, tuple[Path, Manifest]] = {}


@pytest.fixture(autouse=True)
def _trust_toy_factories() -> Iterator[None]:
    """The toy models' factories (tests.cloud.toy_models) are these tests' own code: built
    here as a package's factory, they need the trust flag (docs/PACKAGE.md, threat model)."""
    with trust_package_code():
        yield


@pytest.fixture(scope="module")
def packages(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], tuple[Path, Manifest]]]:
    """Pack each case once per module; return (package dir, manifest written by pack)."""
    base = tmp_path_factory.mktemp("stages")

    def get(case_id: str) -> tuple[Path, Manifest]:
        if case_id not in _packed:
            case = CASES[case_id]
            out = base / case_id
            manifest = pack(case.factory, out, config=case.config)
            _packed[case_id] = (out, manifest)
        return _packed[case_id]

    yield get
    _packed.clear()


def _eager(case: Case, x: torch.Tensor) -> torch.Tensor:
    model = build_model(case.factory, case.config, init=True)
    with torch.inference_mode():
        out: torch.Tensor = model(x)
    return out


def _cicada(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cicada", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- detection -------------------------------------------------------------------------------


@cases
def test_detected_method_and_stages(
    case_id: str, packages: Callable[[str], tuple[Path, Manifest]]
) -> None:
    case = CASES[case_id]
    pkg, written = packages(case_id)
    manifest = Manifest.load(pkg)
    assert manifest == written
    assert manifest.staging_method == case.method
    assert [s.name for s in manifest.stages] == case.stages
    if case.modules:
        assert [list(s.modules) for s in manifest.stages] == case.modules
    assert [s.index for s in manifest.stages] == list(range(len(case.stages)))
    assert all(s.tensors for s in manifest.stages), "a stage without tensors"


@cases
def test_every_state_dict_tensor_stored_once(
    case_id: str, packages: Callable[[str], tuple[Path, Manifest]]
) -> None:
    case = CASES[case_id]
    _, manifest = packages(case_id)
    state = build_model(case.factory, case.config, init=True).state_dict()
    stored = [t.name for t in manifest.tensors()]
    assert len(stored) == len(set(stored)), "a tensor is stored twice"
    assert not set(stored) & set(manifest.aliases)
    assert set(stored) | set(manifest.aliases) == set(state)
    # Stored in state-dict order within the stage plan (registration order = execution order).
    order = [n for n in state if n not in manifest.aliases]
    assert stored == order


def test_sequential_detected_through_plan_stages() -> None:
    model = toy_models.build_mlp(width=8)
    names = list(model.state_dict())
    plan = plan_stages(model, names, {n: 4 for n in names})
    assert plan.method == "sequential"
    assert plan.stages == [
        ("0", ["0.weight", "0.bias"]),
        ("2", ["2.weight", "2.bias"]),
        ("4", ["4.weight", "4.bias"]),
    ]


def test_gpt2_stages_and_tied_weight(packages: Callable[[str], tuple[Path, Manifest]]) -> None:
    _, manifest = packages("gpt2")
    pre, h0, h1, post = manifest.stages
    assert [t.name for t in pre.tensors] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert all(t.name.startswith("transformer.h.0.") for t in h0.tensors)
    assert all(t.name.startswith("transformer.h.1.") for t in h1.tensors)
    assert len(h0.tensors) == len(h1.tensors) == 12
    assert [t.name for t in post.tensors] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    # The tied output projection is stored once, in the earliest stage that uses it.
    assert manifest.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in {t.name for t in manifest.tensors()}
    cfg = gpt2.tiny_config()
    (wte,) = [t for t in pre.tensors if t.name == "transformer.wte.weight"]
    assert wte.shape == (cfg["vocab_size"], cfg["n_embd"])
    # Non-persistent buffers (pos_ids) are rebuilt by the constructor, never stored.
    assert not any("pos_ids" in t.name for t in manifest.tensors())


def test_bert_blocks(packages: Callable[[str], tuple[Path, Manifest]]) -> None:
    _, manifest = packages("bert")
    pre, l0, l1, post = manifest.stages
    assert all(t.name.startswith("embeddings.") for t in pre.tensors)
    assert all(t.name.startswith("layers.0.") for t in l0.tensors)
    assert all(t.name.startswith("layers.1.") for t in l1.tensors)
    assert [t.name for t in post.tensors] == ["pooler.dense.weight", "pooler.dense.bias"]
    assert list(l0.modules) == ["layers.0"]


def test_resnet_children_stem_layers_fc(packages: Callable[[str], tuple[Path, Manifest]]) -> None:
    _, manifest = packages("resnet")
    stem = manifest.stages[0]
    assert [t.name for t in stem.tensors] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
    ]
    for stage in manifest.stages[1:5]:
        assert all(t.name.startswith(stage.name + ".") for t in stage.tensors)
    assert [t.name for t in manifest.stages[-1].tensors] == ["fc.weight", "fc.bias"]


def test_declared_stages_win_over_detection(
    packages: Callable[[str], tuple[Path, Manifest]],
) -> None:
    _, manifest = packages("declared")
    front, back = manifest.stages
    assert [t.name for t in front.tensors] == [
        "embed.weight",
        "embed.bias",
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
    ]
    assert [t.name for t in back.tensors] == ["head.weight", "head.bias"]
    # Without the declaration the same modules are cut at each child.
    model = toy_models.build_declared()
    names = list(model.state_dict())
    plan = plan_stages(_without_declaration(model), names, {n: 4 for n in names})
    assert plan.method == "children"
    assert [name for name, _ in plan.stages] == ["embed", "body", "head"]


def _without_declaration(model: nn.Module) -> nn.Module:
    """The same module tree under a class that declares nothing."""
    plain = nn.Module()
    for name, child in model.named_children():
        plain.add_module(name, child)
    return plain


def test_declared_longest_path_wins() -> None:
    model = toy_models.build_declared_nested()
    names = list(model.state_dict())
    plan = plan_stages(model, names, {n: 4 for n in names})
    assert plan.method == "declared"
    assert plan.stages[0] == ("embed", ["embed.weight", "embed.bias"])
    assert plan.stages[1][0] == "rest"
    assert plan.stages[1][1] == [n for n in names if not n.startswith("embed.")]


def test_declared_missing_tensor_is_a_staging_error(tmp_path: Path) -> None:
    model = toy_models.build_declared_missing()
    names = list(model.state_dict())
    with pytest.raises(StagingError, match=r"tensor head\.weight .*cicada_stages\(\).*\(head\)"):
        plan_stages(model, names, {n: 4 for n in names})
    out = tmp_path / "pkg"
    with pytest.raises(StagingError, match=r"head\.weight"):
        pack(f"{TOY}:build_declared_missing", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "pack left a temporary directory behind"


def test_declared_missing_tensor_cli(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    result = _cicada("pack", "--model", f"{TOY}:build_declared_missing", "--out", out)
    assert result.returncode != 0
    assert "head.weight" in result.stderr
    assert "cicada_stages()" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("bad", [[], None, [("only-a-name",)], [("a", ["embed"], "extra")]])
def test_declared_malformed_spec(bad: Any) -> None:
    class BadDeclaration(toy_models.Declared):
        def cicada_stages(self) -> Any:
            return bad

    model = BadDeclaration(16)
    names = list(model.state_dict())
    with pytest.raises(StagingError, match=r"cicada_stages\(\)"):
        plan_stages(model, names, {n: 4 for n in names})


def test_whole_model_note_says_how_to_declare(
    packages: Callable[[str], tuple[Path, Manifest]],
) -> None:
    _, manifest = packages("whole")
    (stage,) = manifest.stages
    assert [t.name for t in stage.tensors] == ["w1", "b1", "w2", "b2", "scale"]
    assert "Flat" in manifest.staging_note
    assert "cicada_stages()" in manifest.staging_note


def test_whole_model_cli_pack_prints_note(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    result = _cicada("pack", "--model", f"{TOY}:build_flat", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "1 stages (whole)" in result.stdout
    assert "note:" in result.stderr and "cicada_stages()" in result.stderr
    assert Manifest.load(out).staging_method == "whole"


# -- served output ---------------------------------------------------------------------------


@cases
def test_cicada_run_fresh_process_matches_eager(
    case_id: str, packages: Callable[[str], tuple[Path, Manifest]], tmp_path: Path
) -> None:
    case = CASES[case_id]
    pkg, manifest = packages(case_id)
    x = case.make_input()
    np.save(tmp_path / "x.npy", x.numpy())
    result = _cicada(
        "run", pkg, "--input", tmp_path / "x.npy", "--out", tmp_path / "y.npy", "--events",
        "--trust-package-code",  # the toy factories (tests.cloud.toy_models) are test code
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    served = torch.from_numpy(np.load(tmp_path / "y.npy"))
    expected = _eager(case, x)
    assert served.shape == expected.shape
    assert served.dtype == expected.dtype
    assert torch.equal(served, expected), (served - expected).abs().max()
    # One residency event (a JSON line) per stage.
    events = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(events) == len(manifest.stages)
