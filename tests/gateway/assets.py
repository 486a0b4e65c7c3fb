"""Small real model directories for the gateway's tests: a word-level tokenizer.json (the
`tokenizers` library's own format) and a tiny ONNX embedding model (an embedding table, mean
over the sequence, L2-normalised), built in seconds without torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cicada.common.edge_model import INFO_NAME, ONNX_NAME
from cicada.common.text import TOKENIZER_NAME

VOCAB = 97  # the tiny GPT-2's vocabulary
EMBED_DIM = 8


def words(ids: list[int]) -> str:
    """The text whose tokens are `ids`, in the tokenizer `write_tokenizer` writes."""
    return " ".join(f"w{i}" for i in ids)


def write_tokenizer(directory: Path, vocab: int = VOCAB) -> Path:
    """A word-level tokenizer: "w0" ... "w{vocab-1}" are ids 0 ... vocab-1 (w0 doubles as the
    unknown word and the pad); words split on whitespace, decoded joined by spaces."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    path = directory / TOKENIZER_NAME
    tok.save(str(path))
    return path


def embedding_table(vocab: int = VOCAB, dim: int = EMBED_DIM) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((vocab, dim)).astype(np.float32)


def expected_embeddings(ids: np.ndarray) -> np.ndarray:
    """What the model computes, in numpy: mean of the rows of `ids`' tokens, L2-normalised."""
    mean = embedding_table()[ids].mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def write_embedding_model(directory: Path) -> Path:
    """An edge model directory (model.onnx, edge_model.json, tokenizer.json) that embeds token
    ids (batch, seq) int64 into (batch, EMBED_DIM) float32 unit vectors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input"], ["rows"]),  # (B, T, D)
            helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[1], keepdims=0),  # (B, D)
            helper.make_node("LpNormalization", ["mean"], ["output"], axis=1, p=2),
        ],
        "tiny-embedding",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [numpy_helper.from_array(embedding_table(), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / ONNX_NAME))
    info = {
        "variant": "tiny-embedding",
        "int8": False,
        "edge_config": {"vocab_size": VOCAB, "max_position_embeddings": 32},
        "input": {"name": "input", "dtype": "int64", "shape": [-1, -1]},
        "output": {"name": "output", "dtype": "float32", "shape": [-1, EMBED_DIM]},
    }
    (directory / INFO_NAME).write_text(json.dumps(info))
    write_tokenizer(directory)
    return directory


def gateway_view(edge_dir: Path, directory: Path) -> Path:
    """What the gateway reads of a tiny GPT-2 edge model: its edge_model.json and a
    tokenizer.json (the agent itself serves the directory without one)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(edge_dir / INFO_NAME, directory / INFO_NAME)
    write_tokenizer(directory)
    return directory
