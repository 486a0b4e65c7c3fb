"""The gateway over plain HTTP: curl (where installed) and the standard library's http.client,
for what the typed clients cannot send: oversized, chunked, malformed and hostile bodies,
priority and deadline headers, and the statuses each outcome documents (docs/GATEWAY.md)."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.gateway.conftest import EDGE_AGENTS, MAX_BODY_BYTES, GatewayStack

COMPLETION = {"model": "gpt2", "prompt": [5, 17, 42], "max_tokens": 3}
INFER = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}


def _request(
    gw: GatewayStack, method: str, path: str, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:  # fmt: skip
    """(status, headers (case-insensitive), parsed JSON body or raw bytes)."""
    where = urlsplit(gw.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return response.status, response.headers, parsed
    finally:
        conn.close()


def _post(gw: GatewayStack, path: str, doc: Any, **headers: str) -> tuple[int, Any, Any]:
    return _request(gw, "POST", path, json.dumps(doc).encode(), headers)


def _openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_oversized_bodies_are_413_and_the_gateway_serves_on(gw: GatewayStack) -> None:
    big = b'{"model": "gpt2", "prompt": "' + b"w1 " * MAX_BODY_BYTES + b'"}'
    status, _, body = _request(gw, "POST", "/v1/completions", big)
    assert status == 413 and _openai_error(body)["code"] == "request_too_large"
    # Without Content-Length (chunked): counted while it streams in.
    where = urlsplit(gw.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    chunks = (b"x" * 65536 for _ in range(MAX_BODY_BYTES // 65536 + 2))
    conn.request("POST", "/v2/models/emb/infer", body=chunks, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "error" in json.loads(response.read())
    conn.close()
    assert _post(gw, "/v1/completions", COMPLETION)[0] == 200


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"text"', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"],
    ids=["malformed", "array", "string", "deep", "not-utf8"],
)
def test_malformed_json_is_400(gw: GatewayStack, raw: bytes) -> None:
    status, _, body = _request(gw, "POST", "/v1/completions", raw)
    assert status == 400 and _openai_error(body)["type"] == "invalid_request_error"
    status, _, body = _request(gw, "POST", "/v2/models/emb/infer", raw)
    assert status == 400 and isinstance(body["error"], str)


TENSOR_CASES = [
    "count",
    "negative",
    "bytes",
    "float",
    "ragged",
    "range",
    "huge",
    "rank",
    "rank9",
    "nodata",
    "noname",
    "vast-empty",
]


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "input", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3]},  # count
        {"name": "input", "shape": [1, -3], "datatype": "INT64", "data": [1, 2, 3]},
        {"name": "input", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b", "c"]},
        {"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [1.5, 2, 3]},
        {"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2], [3]]},
        {"name": "input", "shape": [1, 3], "datatype": "INT8", "data": [1, 2, 300]},
        {"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 10**30]},
        {"name": "input", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},  # rank
        {"name": "input", "shape": [1] * 9, "datatype": "INT64", "data": [1]},
        {"name": "input", "shape": [1, 3], "datatype": "INT64"},  # no data
        {"shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},  # no name
        # Regression: no values to contradict it, so numpy's ValueError: a 500, not a 400.
        {"name": "input", "shape": [2**63, 0], "datatype": "INT64", "data": []},
    ],
    ids=TENSOR_CASES,
)
def test_wrong_tensors_are_400(gw: GatewayStack, tensor: dict[str, Any]) -> None:
    status, _, body = _post(gw, "/v2/models/emb/infer", {"inputs": [tensor]})
    assert status == 400, body
    assert isinstance(body["error"], str) and body["error"]


def test_binary_data_that_does_not_add_up_is_400(gw: GatewayStack) -> None:
    tensor = {"name": "input", "shape": [1, 3], "datatype": "INT64",
              "parameters": {"binary_data_size": 24}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    for payload, length in ((b"\0" * 16, len(header)), (b"\0" * 24, len(header) + 999),
                            (b"\0" * 32, len(header)), (b"\0" * 24, -1)):  # fmt: skip
        status, _, body = _request(
            gw, "POST", "/v2/models/emb/infer", header + payload,
            {"Inference-Header-Content-Length": str(length)},
        )  # fmt: skip
        assert status == 400, (length, body)
    vast = {**tensor, "shape": [2**63, 0], "parameters": {"binary_data_size": 0}}
    header = json.dumps({"inputs": [vast]}).encode()
    status, _, body = _request(gw, "POST", "/v2/models/emb/infer", header,
                               {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert status == 400 and "shape" in body["error"], body
    header = json.dumps({"inputs": [tensor]}).encode()
    status, _, raw = _request(  # what does add up is served, binary out on request
        gw, "POST", "/v2/models/emb/infer", header + (b"\1" + b"\0" * 7) * 3,
        {"Inference-Header-Content-Length": str(len(header))},
    )  # fmt: skip
    assert status == 200 and raw["outputs"][0]["data"]


def test_unknown_models_and_paths_are_404(gw: GatewayStack) -> None:
    status, _, body = _post(gw, "/v1/embeddings", {"model": "nope", "input": "w1"})
    assert status == 404 and _openai_error(body)["code"] == "model_not_found"
    status, _, body = _post(gw, "/v2/models/nope/infer", INFER)
    assert status == 404 and "nope" in body["error"]
    assert _request(gw, "GET", "/v2/models/nope/ready")[0] == 404
    status, _, body = _request(gw, "GET", "/v1/no-such-endpoint")
    assert status == 404 and _openai_error(body)["code"] == "not_found"
    assert _request(gw, "GET", "/v1/completions")[0] == 405


def test_priority_reaches_the_coordinator_from_header_and_parameters(gw: GatewayStack) -> None:
    # The stack's coordinator reserves priority 0 for nobody: its refusal proves arrival.
    status, _, body = _post(gw, "/v1/completions", COMPLETION, **{"X-Cicada-Priority": "0"})
    assert status == 400 and "priority 0" in _openai_error(body)["message"]
    status, _, body = _post(gw, "/v1/completions", {**COMPLETION, "priority": 0})
    assert status == 400 and "priority 0" in _openai_error(body)["message"]
    # The request's own parameter wins over the header.
    headers = {"X-Cicada-Priority": "0"}
    assert _post(gw, "/v1/completions", {**COMPLETION, "priority": 2}, **headers)[0] == 200
    status, _, body = _post(gw, "/v2/models/emb/infer", {**INFER, "parameters": {"priority": 0}})
    assert status == 400 and "priority 0" in body["error"]
    assert _post(gw, "/v2/models/emb/infer", INFER, **{"X-Cicada-Priority": "2"})[0] == 200
    for bad in ("7", "high", "1.5"):
        status, _, body = _post(gw, "/v1/completions", COMPLETION, **{"X-Cicada-Priority": bad})
        assert status == 400 and _openai_error(body)["param"] == "priority"


def test_deadlines_from_header_and_parameters(gw: GatewayStack) -> None:
    status, _, body = _post(gw, "/v1/completions", COMPLETION, **{"X-Cicada-Deadline-Ms": "0"})
    assert status == 504 and _openai_error(body)["code"] == "deadline_exceeded"
    status, _, body = _post(gw, "/v2/models/emb/infer", {**INFER, "parameters":
                                                         {"deadline_ms": -5}})  # fmt: skip
    assert status == 504
    for bad in ("soon", "nan", "1e12"):
        headers = {"X-Cicada-Deadline-Ms": bad}
        assert _post(gw, "/v1/completions", COMPLETION, **headers)[0] == 400
    assert _post(gw, "/v1/completions", {**COMPLETION, "deadline_ms": 30000})[0] == 200
    headers = {"X-Cicada-Deadline-Ms": "30000"}
    assert _post(gw, "/v2/models/emb/infer", INFER, **headers)[0] == 200


def test_refused_completion_fields_are_400(gw: GatewayStack) -> None:
    for field, value in (("n", 2), ("logprobs", 3), ("stop", ["\n"]), ("echo", True),
                         ("max_tokens", 5000), ("stream", "yes")):  # fmt: skip
        status, _, body = _post(gw, "/v1/completions", {**COMPLETION, field: value})
        assert status == 400 and _openai_error(body)["param"] == field, (field, body)
    status, _, body = _post(gw, "/v1/completions", {**COMPLETION, "prompt": [[1, 2], ["x"]]})
    assert status == 400 and _openai_error(body)["param"] == "prompt"
    two = _post(gw, "/v1/completions", {**COMPLETION, "prompt": [[1, 2], [3, 4, 5]]})
    assert two[0] == 200 and [c["index"] for c in two[2]["choices"]] == [0, 1]
    # One prompt the model refuses (outside its vocabulary of 97) fails the whole batch.
    status, _, body = _post(gw, "/v1/completions", {**COMPLETION, "prompt": [[1, 2], [500]]})
    assert status == 400 and "0..96" in _openai_error(body)["message"]
    # Regression: an id past int64 failed the conversion to a tensor: a 500, not a 400.
    for route, name in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
        for ids in ([1, 10**30], [[1], [2**63]]):
            body_in = {**COMPLETION, "model": "gpt2" if name == "prompt" else "emb", name: ids}
            status, _, body = _post(gw, route, body_in)
            assert status == 400 and _openai_error(body)["param"] == name, (route, ids, body)


curl = shutil.which("curl")


@pytest.mark.skipif(curl is None, reason="curl is not installed")
def test_curl_completion_stream_and_infer(gw: GatewayStack) -> None:
    def run(*args: str) -> str:
        done = subprocess.run([curl, "-sS", "--max-time", "60", *args],  # type: ignore[list-item]
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    json_header = ["-H", "Content-Type: application/json"]
    plain = json.loads(run(*json_header, "-d", json.dumps(COMPLETION), gw.url + "/v1/completions"))
    expected = plain["choices"][0]["cicada"]["token_ids"]
    assert len(expected) == 3
    events = run("-N", *json_header, "-d", json.dumps({**COMPLETION, "stream": True}),
                 gw.url + "/v1/completions").split("\n\n")  # fmt: skip
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    streamed = [t for c in chunks for t in c["choices"][0]["cicada"]["token_ids"]]
    assert streamed == expected
    assert {c["choices"][0]["cicada"]["served_by"]["role"] for c in chunks[:-1]} == {"edge"}
    infer = json.loads(run(*json_header, "-d", json.dumps(INFER),
                           gw.url + "/v2/models/emb/infer"))  # fmt: skip
    assert infer["outputs"][0]["shape"] == [1, 8]
    assert run("-o", "/dev/null", "-w", "%{http_code}", gw.url + "/v2/health/ready") == "200"


def test_a_model_nobody_serves_now_is_503_with_retry_after(gw: GatewayStack) -> None:
    # A third agent registers "spare", then dies: the coordinator knows the model, nobody
    # serves it. (Last in this module: it changes what the coordinator knows.)
    gw.stack.edge("spare", gw.edge_dir, "edge-spare")
    gw.stack.wait_workers("edge", EDGE_AGENTS + 1, state="ready")
    gw.stack.kill("edge-spare", signal.SIGKILL)
    gw.stack.wait_for(
        lambda s: not any(w["model"] == "spare" for w in s["workers"]), what="spare gone"
    )
    status, headers, body = _post(gw, "/v2/models/spare/infer", INFER)
    assert status == 503 and int(headers["Retry-After"]) >= 1, body
    status, headers, body = _post(gw, "/v1/completions", {**COMPLETION, "model": "spare"})
    assert status == 503 and _openai_error(body)["code"] == "unavailable"
    assert int(headers["Retry-After"]) >= 1
