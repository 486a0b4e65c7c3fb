"""`cicada export-edge --full-depth`: every layer kept, int8, as a draft for speculative decoding.

The packaged model is a tiny GPT-2 whose blocks' matrices are scaled up (`contextual`, as in
test_speculative.py): the plain seeded GPT-2 mostly repeats its last token, which any variant
predicts, so agreement would not tell a full-depth draft from a truncated one. Agreement is
measured, not assumed: the share of positions where the edge model's greedy token, given the
cloud model's own prefix, equals the cloud model's; the full-depth int8 draft must beat the
truncated one on the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cicada.cli.export import export_edge_cmd
from cicada.cloud.export_edge import edge_config_for, export_edge
from cicada.cloud.generate import decoder_for
from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.common.edge_model import DECODER_INT8_NAME, INFO_NAME
from cicada.common.generation import GenerationRequest, generate
from cicada.edge.onnx_model import EdgeModel
from tests.cloud.test_speculative import contextual

CONFIG = {**gpt2.tiny_config(), "n_layer": 4, "seed": 3}
FACTORY = "cicada.cloud.models.gpt2:build"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full-depth")
    pack(FACTORY, root / "pkg", config=CONFIG, model=contextual(4.0, n_layer=4, seed=3))
    export_edge(root / "pkg", root / "full", int8=True, full_depth=True)
    export_edge(root / "pkg", root / "cut", int8=True)
    return {"pkg": root / "pkg", "full": root / "full", "cut": root / "cut"}


def agreement(edge: EdgeModel, cloud: gpt2.GPT, count: int = 12, n: int = 24) -> float:
    """Share of positions where the edge's greedy token, after the cloud's prefix, is the
    cloud's greedy token (one edge forward over each whole cloud sequence)."""
    rng = np.random.default_rng(5)
    hits = total = 0
    for _ in range(count):
        prompt = rng.integers(0, CONFIG["vocab_size"], size=int(rng.integers(2, 12)))
        prompt = prompt.astype(np.int64)
        request = GenerationRequest(prompt, n)
        tokens = generate(decoder_for(cloud), request, lambda t: None).tokens
        seq = np.concatenate([prompt, tokens])[None]  # (1, P + n)
        logits = edge.run([seq[:, :-1]])[0]  # (1, P + n - 1, V)
        guesses = logits[0, len(prompt) - 1 :].argmax(-1)
        hits += int((guesses == np.asarray(tokens)).sum())
        total += n
    return hits / total


def test_full_depth_int8_keeps_every_layer_and_agrees_better(exported: dict[str, Path]) -> None:
    cloud = contextual(4.0, n_layer=4, seed=3)
    full = EdgeModel.load(exported["full"])
    cut = EdgeModel.load(exported["cut"])
    info = json.loads((exported["full"] / INFO_NAME).read_text())
    assert info["full_depth"] is True and info["int8"] is True
    assert info["edge_config"]["n_layer"] == cloud.config.n_layer == 4
    assert full.variant == "gpt2-edge-L4-int8" and full.path.name == "model.int8.onnx"
    assert (exported["full"] / DECODER_INT8_NAME).is_file()
    assert json.loads((exported["cut"] / INFO_NAME).read_text())["edge_config"]["n_layer"] == 1
    full_agrees, cut_agrees = agreement(full, cloud), agreement(cut, cloud)
    assert full_agrees > cut_agrees, (full_agrees, cut_agrees)
    assert full_agrees > 0.5, full_agrees  # "most of the prompt set"


def test_the_full_depth_drafter_drafts_what_the_cloud_decodes(exported: dict[str, Path]) -> None:
    """The cached int8 graph through edge/drafter.py, rolled back after a wrong continuation,
    proposes what the one-shot graph predicts."""
    full = EdgeModel.load(exported["full"])
    drafter = full.new_drafter()
    assert drafter is not None
    prompt = [3, 14, 15, 92, 65]
    first = drafter.draft(prompt, 4)
    assert len(first) == 4
    drafter.draft([*prompt, *first, 7, 7, 7], 2)  # a continuation that will be cut off
    again = drafter.draft([*prompt, first[0]], 3)
    assert again == first[1:4]
    logits = full.run([np.asarray([prompt], dtype=np.int64)])[0]
    assert first[0] == int(logits[0, -1].argmax())
    assert drafter.draft(prompt, 0) == []


def test_cli_full_depth(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(gpt2.tiny_config()))
    out = tmp_path / "edge"
    result = CliRunner().invoke(
        export_edge_cmd,
        ["--model", FACTORY, "--config", str(config), "--out", str(out), "--int8",
         "--full-depth"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / INFO_NAME).read_text())
    assert info["edge_config"]["n_layer"] == 2 and info["full_depth"] is True
    assert info["variant"] == "gpt2-edge-L2-int8"
    assert "--full-depth" in CliRunner().invoke(export_edge_cmd, ["--help"]).output


def test_full_depth_is_the_rule_with_divisor_one() -> None:
    medium, name = edge_config_for(FACTORY, {}, full_depth=True)
    assert medium["n_layer"] == 24 and name == "gpt2-edge-L24"
    assert edge_config_for(FACTORY, {})[0]["n_layer"] == 6
