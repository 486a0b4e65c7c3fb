"""Open Inference Protocol v2 through the real `tritonclient.http`, unmodified: health, model
metadata and readiness, inference with JSON tensors and with the binary-data extension;
results checked against the SDK's and against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from cicada import Client
from tests.gateway.assets import EMBED_DIM, expected_embeddings
from tests.gateway.conftest import GatewayStack

httpclient = pytest.importorskip("tritonclient.http")
triton_utils = pytest.importorskip("tritonclient.utils")

IDS = np.array([[3, 1, 4, 1, 5, 9]], dtype=np.int64)


def _client(gw: GatewayStack) -> object:
    return httpclient.InferenceServerClient(url=gw.url.removeprefix("http://"))


def _infer(gw: GatewayStack, model: str, ids: np.ndarray, binary: bool) -> object:
    inp = httpclient.InferInput("input", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    return _client(gw).infer(model, [inp], outputs=[out])


def test_health_and_model_metadata(gw: GatewayStack) -> None:
    client = _client(gw)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gpt2") and client.is_model_ready("emb")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("emb")
    assert meta["name"] == "emb" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, EMBED_DIM]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with pytest.raises(triton_utils.InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert missing.value.status() == "404"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_returns_what_the_sdk_returns(gw: GatewayStack, binary: bool) -> None:
    with Client(gw.address, timeout=60) as sdk:
        expected = sdk.invoke("gpt2", IDS).output
    result = _infer(gw, "gpt2", IDS, binary)
    logits = result.as_numpy("output")
    assert logits.dtype == np.float32 and logits.shape == expected.shape == (1, 6, 97)
    np.testing.assert_array_equal(logits, expected)  # the same agent: bit-identical
    assert result.get_response()["parameters"]["cicada_role"] == "edge"


def test_infer_embeddings_match_numpy(gw: GatewayStack) -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    got = _infer(gw, "emb", ids, binary=True).as_numpy("output")
    np.testing.assert_allclose(got, expected_embeddings(ids), atol=1e-5)


def test_infer_refusals_are_statuses_and_the_gateway_serves_on(gw: GatewayStack) -> None:
    client = _client(gw)
    wrong_dtype = httpclient.InferInput("input", [1, 3], "INT32")
    wrong_dtype.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    with pytest.raises(triton_utils.InferenceServerException) as bad:
        client.infer("emb", [wrong_dtype])
    assert bad.value.status() == "400" and "dtype" in bad.value.message()
    wrong_name = httpclient.InferInput("ids", [1, 3], "INT64")
    wrong_name.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    with pytest.raises(triton_utils.InferenceServerException) as named:
        client.infer("emb", [wrong_name])
    assert named.value.status() == "400"
    with pytest.raises(triton_utils.InferenceServerException) as unknown:
        _infer(gw, "no-such-model", IDS, binary=False)
    assert unknown.value.status() == "404"
    out_of_vocab = np.array([[500]], dtype=np.int64)  # checked by the worker: BAD_REQUEST
    with pytest.raises(triton_utils.InferenceServerException) as vocab:
        _infer(gw, "gpt2", out_of_vocab, binary=False)
    assert vocab.value.status() == "400"
    assert _infer(gw, "gpt2", IDS, binary=True).as_numpy("output").shape == (1, 6, 97)
