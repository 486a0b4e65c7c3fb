"""Open Inference Protocol v2 (KServe, Triton) over REST: GET /v2, /v2/health/live,
/v2/health/ready, /v2/models/{name}[/versions/{v}], .../ready, POST .../infer with JSON tensors
or the binary-data extension (tensors.py).

A model has one version, "1"; a version in the path is accepted and not checked. Who served a
request is in the response's `parameters` (`cicada_role`, `cicada_worker`, `cicada_variant`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cicada.common.errors import InputError
from cicada.gateway import jsonio
from cicada.gateway.errors import HttpError, bad_request, unknown_model
from cicada.gateway.jsonio import JsonResponse
from cicada.gateway.requests import admission, parse_json, read_body
from cicada.gateway.service import Gateway, gateway
from cicada.gateway.tensors import HEADER_LENGTH, datatype_of, decode_inputs, encode_outputs

MODEL_VERSION = "1"
NOT_READY_RETRY_S = 1.0


def routes() -> list[Route]:
    out = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [
            Route(base, model_metadata, methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        ]
    return out


async def server_metadata(request: Request) -> Response:
    try:
        release = version("cicada")
    except PackageNotFoundError:
        release = "unknown"
    return JsonResponse(
        {"name": "cicada", "version": release, "extensions": ["binary_tensor_data"]}
    )


async def live(request: Request) -> Response:
    return Response(status_code=200)


async def ready(request: Request) -> Response:
    """200 when some model has a ready worker (per the coordinator's metrics); without
    --metrics, whenever the gateway is up. 503 otherwise."""
    gw = gateway(request)
    snapshot = await gw.catalog.snapshot()
    if snapshot is None or any(snapshot.ready(m) for m in snapshot.workers):
        return Response(status_code=200)
    reason = snapshot.error or "no model has a ready worker"
    raise HttpError(503, reason, code="not_ready", retry_after=NOT_READY_RETRY_S)


async def _known(gw: Gateway, name: str) -> None:
    if not await gw.catalog.known(name):
        raise unknown_model(name)


async def model_metadata(request: Request) -> Response:
    gw = gateway(request)
    name = request.path_params["name"]
    await _known(gw, name)
    known = gw.catalog.dirs.get(name)

    def specs(which: str) -> list[dict[str, Any]]:
        found = () if known is None else getattr(known, which)
        return [{"name": s.name, "datatype": datatype_of(s.dtype),
                 "shape": [-1 if d is None else d for d in s.shape]} for s in found]  # fmt: skip

    return JsonResponse({"name": name, "versions": [MODEL_VERSION], "platform": "cicada",
                         "inputs": specs("inputs"), "outputs": specs("outputs")})  # fmt: skip


async def model_ready(request: Request) -> Response:
    gw = gateway(request)
    name = request.path_params["name"]
    await _known(gw, name)
    if await gw.catalog.ready(name):
        return Response(status_code=200)
    raise HttpError(503, f"model {name!r} has no ready worker", code="not_ready",
                    retry_after=NOT_READY_RETRY_S)  # fmt: skip


async def infer(request: Request) -> Response:
    gw = gateway(request)
    name = request.path_params["name"]
    raw = await read_body(request, gw.config.max_body_bytes)
    header, binary = _split(raw, request.headers.get(HEADER_LENGTH))
    doc = parse_json(header)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("'parameters' must be an object", "parameters")
    adm = admission(request, params)
    arrays = _in_model_order(gw, name, decode_inputs(doc.get("inputs"), binary))
    result = await gw.invoke(name, arrays, adm)
    names = _output_names(gw, name, len(result.outputs))
    chosen, as_binary = _requested(doc.get("outputs"), names, params.get("binary_data_output"))
    entries, chunks = encode_outputs(
        [names[i] for i in chosen], [result.outputs[i] for i in chosen], as_binary
    )
    served = result.served_by or {}
    body: dict[str, Any] = {
        "model_name": name, "model_version": MODEL_VERSION, "outputs": entries,
        "parameters": {f"cicada_{k}": str(served.get(k, "")) for k in
                       ("role", "worker", "variant")},
    }  # fmt: skip
    if isinstance(doc.get("id"), str):
        body["id"] = doc["id"]
    if not chunks:
        return JsonResponse(body)
    head = jsonio.dumps(body)
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _split(raw: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    """(the JSON header, the binary section or None) of a request body."""
    if header_length is None:
        return raw, None
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise bad_request(
            f"Inference-Header-Content-Length {header_length[:32]!r} is not a length within "
            f"the body's {len(raw)} bytes"
        )
    n = int(header_length)
    return raw[:n], memoryview(raw)[n:]


def _in_model_order(gw: Gateway, model: str, pairs: list[tuple[str, np.ndarray]]) -> list[Any]:
    """The arrays in the order the model takes them, checked against its signature when the
    gateway knows it (--package); else in the order sent, for the worker to check."""
    known = gw.catalog.dirs.get(model)
    if known is None or not known.inputs:
        return [array for _, array in pairs]
    given = dict(pairs)
    expected = [s.name for s in known.inputs]
    if len(given) != len(pairs) or sorted(given) != sorted(expected):
        raise bad_request(
            f"model {model!r} takes the inputs {expected}, got {[n for n, _ in pairs]}", "inputs"
        )
    for spec in known.inputs:
        try:
            spec.check(given[spec.name])
        except InputError as exc:
            raise bad_request(f"model {model!r}: {exc}", "inputs") from None
    return [given[name] for name in expected]


def _output_names(gw: Gateway, model: str, count: int) -> list[str]:
    known = gw.catalog.dirs.get(model)
    if known is not None and len(known.outputs) == count:
        return [s.name for s in known.outputs]
    return ["output" if i == 0 else f"output_{i}" for i in range(count)]


def _requested(outputs: Any, names: list[str], binary_default: Any) -> tuple[list[int], list[bool]]:
    """Which outputs to send (indexes) and which of them as binary data."""
    default = binary_default is True
    if outputs is None:
        return list(range(len(names))), [default] * len(names)
    if not isinstance(outputs, list):
        raise bad_request("'outputs' must be a list", "outputs")
    chosen, as_binary = [], []
    for entry in outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in names:
            raise bad_request(f"requested output {name!r} is not one of {names}", "outputs")
        params = entry.get("parameters") or {}
        flag = params.get("binary_data", default) if isinstance(params, dict) else default
        chosen.append(names.index(name))
        as_binary.append(flag is True)
    return chosen, as_binary
