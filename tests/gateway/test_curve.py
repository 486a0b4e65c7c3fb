"""CURVE from the gateway to the coordinator, on real processes: gateways holding a client key
the coordinator allows serve (two at once beside one coordinator); a gateway without keys
never reaches it and answers 504, and keeps serving its health endpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from cicada.testing import ROOT, Stack
from cicada.testing.gateway import start_gateway

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")

INFER = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}


def _post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v2/models/gpt2/infer", data=json.dumps(INFER).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> Iterator[tuple[Stack, Path]]:
    work = tmp_path_factory.mktemp("gateway-curve")
    keys, clients = work / "keys", work / "clients"
    subprocess.run(
        [sys.executable, "-m", "cicada", "keys", "--out", str(keys), "--name", "coordinator",
         "--name", "edge1", "--name", "gateway1", "--name", "gateway2"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    clients.mkdir()
    for name in ("gateway1", "gateway2"):
        shutil.copy(keys / f"{name}.key", clients)
    with Stack(work) as stack:
        stack.coordinator("--curve-secret", str(keys / "coordinator.key_secret"),
                          "--allow", str(clients),
                          "--worker-keys", f"edge:gpt2:{keys / 'edge1.key'}")  # fmt: skip
        stack.edge("gpt2", tiny_package["edge"], "edge1",
                   "--curve-key", str(keys / "edge1.key_secret"),
                   "--server-key", str(keys / "coordinator.key"))  # fmt: skip
        stack.wait_workers("edge", 1, state="ready")
        yield stack, keys


def test_gateways_with_allowed_keys_serve_side_by_side(secure: tuple[Stack, Path]) -> None:
    stack, keys = secure
    server = str(keys / "coordinator.key")
    urls = []
    for name in ("gateway1", "gateway2"):
        secret = str(keys / f"{name}.key_secret")
        urls.append(start_gateway(stack, "--curve-key", secret, "--server-key", server, name=name))
    for url in urls:
        status, body = _post(url)
        assert status == 200 and body["outputs"][0]["shape"] == [1, 3, 97], body


def test_a_gateway_without_keys_is_not_let_in(secure: tuple[Stack, Path]) -> None:
    stack, _ = secure
    url = start_gateway(stack, "--timeout", "2", name="plain")
    status, body = _post(url)
    # The SDK fails fast on the refused handshake; the gateway says it is its own key.
    assert status == 502 and "key" in body["error"].lower(), body
    with urllib.request.urlopen(url + "/v2/health/live", timeout=30) as response:
        assert response.status == 200


def test_curve_needs_both_key_options(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cicada", "gateway", "--curve-key", str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "does not exist" in done.stderr
