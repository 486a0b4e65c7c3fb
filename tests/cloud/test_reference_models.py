"""`cicada pack --model NAME`: the reference models by short name (cloud/models/reference.py),
checked against the models' own configs, and packed for real by the command line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cicada.cloud.models import bert, gpt2, resnet
from cicada.cloud.models.reference import CONFIG_KEYS, REFERENCE_MODELS, resolve
from cicada.common.package import Manifest
from cicada.testing.stack import ROOT

CONFIGS: dict[str, Any] = {
    "cicada.cloud.models.gpt2:build": gpt2.GPTConfig,
    "cicada.cloud.models.bert:build": bert.BertConfig,
    "cicada.cloud.models.resnet:build": resnet.ResNetConfig,
}


def cicada(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cicada", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, as a --config file holds them


@pytest.mark.parametrize("factory", sorted(CONFIGS))
def test_listed_keys_and_defaults_are_the_models_own(factory: str) -> None:
    assert CONFIG_KEYS[factory] == as_json(dataclasses.asdict(CONFIGS[factory]()))


def test_short_names_set_only_keys_their_model_takes_and_tiny_is_the_models_tiny() -> None:
    for name, ref in REFERENCE_MODELS.items():
        assert set(ref.config) <= set(CONFIG_KEYS.get(ref.factory, {})), name
    assert resolve("gpt2-tiny").config == gpt2.tiny_config()  # type: ignore[union-attr]
    assert resolve("bert-tiny").config == bert.tiny_config()  # type: ignore[union-attr]
    assert resolve("resnet-tiny").config == resnet.tiny_config()  # type: ignore[union-attr]


def test_pack_gpt2_tiny_by_name_then_verify_it(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    (tmp_path / "seed.json").write_text('{"seed": 3}')
    done = cicada("pack", "--model", "gpt2-tiny", "--config", str(tmp_path / "seed.json"),
                  "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    architecture = Manifest.load(out).architecture
    assert architecture.factory == "cicada.cloud.models.gpt2:build"
    assert architecture.config == {**gpt2.tiny_config(), "seed": 3}  # --config on top
    verified = cicada("pack", "--verify", str(out))
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stderr


def test_pack_help_lists_the_names_and_their_config_keys() -> None:
    shown = cicada("pack", "--help")
    assert shown.returncode == 0
    for name in REFERENCE_MODELS:
        assert f"  {name} " in shown.stdout, name
    assert "n_layer=24" in shown.stdout and "num_hidden_layers=12" in shown.stdout


def test_a_mistyped_name_is_a_usage_error_with_a_close_match(tmp_path: Path) -> None:
    done = cicada("pack", "--model", "gpt2-tiyn", "--out", str(tmp_path / "p"))
    assert done.returncode == 2 and "did you mean 'gpt2-tiny'?" in done.stderr
    assert not (tmp_path / "p").exists()
