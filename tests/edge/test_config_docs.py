"""docs/config.md and config.py's docstring against the config models: a field added without
docs, a default changed, an example that no longer loads, all fail here."""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cicada.edge.coordinator import config as config_module
from cicada.edge.coordinator.config import (
    CicadaConfig,
    ConfigError,
    CoordinatorSection,
    ModelConfig,
    WorkerKeysConfig,
    load_config,
)
from cicada.edge.coordinator.config_docs import generated_block, reference

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config.md"


def default_of(model: type[BaseModel], name: str) -> Any:
    info = model.model_fields[name]
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def test_the_page_holds_the_tables_the_models_make() -> None:
    assert generated_block(PAGE.read_text()) == reference(), (
        "docs/config.md is out of date: run "
        "python3 -m cicada.edge.coordinator.config_docs --write docs/config.md"
    )


def test_every_field_has_a_row_and_a_description() -> None:
    block = generated_block(PAGE.read_text())
    for model in (CoordinatorSection, WorkerKeysConfig, ModelConfig):
        for name, info in model.model_fields.items():
            assert f"| `{name}` |" in block, name
            assert info.description, f"{model.__name__}.{name} has no description"


def test_a_changed_default_changes_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    before = reference()
    monkeypatch.setattr(ModelConfig.model_fields["keep_alive_s"], "default", 31.0)
    assert reference() != before and "`31.0`" in reference()


@pytest.mark.parametrize("index", [0, 1])
def test_the_pages_examples_load(index: int) -> None:
    examples = re.findall(r"```toml\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(examples) == 2
    parsed = CicadaConfig.model_validate(tomllib.loads(examples[index]))
    assert "gpt2" in parsed.models


def docstring_example() -> str:
    """The indented TOML block of config.py's docstring."""
    doc = config_module.__doc__ or ""
    start = doc.index("    [coordinator]")
    end = doc.index("\nRelative paths")
    return textwrap.dedent(doc[start:end])


def test_the_docstring_shows_every_field_at_its_default() -> None:
    text = docstring_example()
    parsed = tomllib.loads(text)
    commented = set(re.findall(r"^#\s*(\w+)\s*=", text, flags=re.M))
    shown = {
        CoordinatorSection: parsed["coordinator"],
        ModelConfig: parsed["models"]["gpt2"],
        WorkerKeysConfig: {},  # all required: shown commented, as an example
    }
    for model, values in shown.items():
        for name, info in model.model_fields.items():
            if name in values:
                if info.default is PydanticUndefined and info.default_factory is None:
                    continue  # required (package): any example value
                got = model.model_validate({**_required(model), name: values[name]})
                assert getattr(got, name) == default_of(model, name), (model, name)
            elif name == "workers":
                assert "# [[coordinator.workers]]" in text
            else:  # only fields without a value by default are shown as a `# ...` example
                assert name in commented, f"{model.__name__}.{name} missing from the docstring"
                assert default_of(model, name) in (None, [], {}) or (
                    info.default is PydanticUndefined
                ), (model, name)


def _required(model: type[BaseModel]) -> dict[str, Any]:
    return {"package": "/p"} if model is ModelConfig else {}


@pytest.mark.parametrize(
    ("line", "bind"),
    [
        ('bind = "127.0.0.1:5600"', "tcp://127.0.0.1:5600"),
        ('bind = "ipc:///tmp/c"', "ipc:///tmp/c"),
    ],
)
def test_a_config_bind_is_normalised(tmp_path: Path, line: str, bind: str) -> None:
    path = tmp_path / "cicada.toml"
    path.write_text(f'[coordinator]\n{line}\nmetrics = "http://127.0.0.1:9470/metrics"\n')
    loaded = load_config(path)
    assert (loaded.coordinator.bind, loaded.coordinator.metrics) == (bind, "127.0.0.1:9470")


def test_a_config_endpoint_typo_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "cicada.toml"
    path.write_text('[coordinator]\nbind = "127.0.0.1"\n')
    with pytest.raises(ConfigError, match=r"coordinator\.bind: .*HOST:PORT"):
        load_config(path)
