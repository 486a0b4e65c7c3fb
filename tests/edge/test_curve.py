"""CURVE on real processes (docs/PROTOCOL.md, section 10): `cicada keys` makes key pairs; a
coordinator started with `--curve-secret`, `--allow DIR` (client keys) and `--worker-keys
edge:MODEL:PATH` serves the client and the edge agent whose public keys are listed, and nobody
else: a client or agent with another key, a
client with the wrong server key, and a plain client are never heard; a raw TCP peer that
speaks plaintext ZMTP is cut off before anything reaches the coordinator."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from cicada.client import Client, CurveConfig
from cicada.common.errors import CicadaError
from cicada.common.protocol import Request, encode
from cicada.common.sockets import CurveKeys
from cicada.errors import KeyRefused
from cicada.testing import ROOT, Stack, curve_handshake, make_assets

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")

MODEL = "gpt2"
NAMES = ("coordinator", "edge1", "client1", "intruder-edge", "intruder-client")
ALLOWED = ("client1",)  # clients; edge1 is bound to edge for MODEL
REFUSED_WAIT_S = 1.5  # client timeout where no reply must come


def cicada_keys(out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    args = [arg for name in names for arg in ("--name", name)]
    return subprocess.run(
        [sys.executable, "-m", "cicada", "keys", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )


def key_pair(keys: Path, name: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
    assert secret is not None
    return public, secret


def curve(keys: Path, name: str, server: str = "coordinator") -> CurveConfig:
    public, secret = key_pair(keys, name)
    server_public = zmq.auth.load_certificate(str(keys / f"{server}.key"))[0]
    return CurveConfig(server_public_key=server_public, public_key=public, secret_key=secret)


# -- cicada keys ------------------------------------------------------------------------------


def test_keys_writes_key_pairs_with_private_secrets(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"  # created if missing
    result = cicada_keys(out, "coordinator", "edge1", "client1")
    publics = set()
    for name in ("coordinator", "edge1", "client1"):
        public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
        assert public_file.is_file() and secret_file.is_file()
        assert str(secret_file) in result.stdout
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        public, none = zmq.auth.load_certificate(str(public_file))
        assert none is None and "secret-key" not in public_file.read_text()
        same_public, secret = zmq.auth.load_certificate(str(secret_file))
        assert same_public == public and secret is not None
        assert len(public) == len(secret) == 40
        assert zmq.curve_public(secret) == public  # a real pair, not two random keys
        publics.add(public)
        loaded = CurveKeys.load(secret_file, out / "coordinator.key")
        assert (loaded.public, loaded.secret) == (public, secret)
    assert len(publics) == 3
    with pytest.raises(CicadaError, match="no secret key"):
        CurveKeys.load(out / "edge1.key", out / "coordinator.key")


def test_keys_secret_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        cicada_keys(tmp_path, "edge9")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "edge9.key_secret").stat().st_mode) == 0o600


# -- a CURVE coordinator ----------------------------------------------------------------------


@dataclass
class Secure:
    stack: Stack
    keys: Path
    x: np.ndarray


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    work = tmp_path_factory.mktemp("curve")
    assets = make_assets(work)
    keys, allow = work / "keys", work / "allow"
    cicada_keys(keys, *NAMES)
    allow.mkdir()
    for name in ALLOWED:
        shutil.copy(keys / f"{name}.key", allow)
    server_key = str(keys / "coordinator.key")
    with Stack(work) as s:
        s.coordinator(
            "--curve-secret", str(keys / "coordinator.key_secret"), "--allow", str(allow),
            "--worker-keys", f"edge:{MODEL}:{keys / 'edge1.key'}",
        )  # fmt: skip
        # The intruder starts first, so it has had every chance to register by the time the
        # allowed agent has.
        s.edge(
            MODEL,
            assets["edge"],
            "intruder-edge",
            "--curve-key",
            str(keys / "intruder-edge.key_secret"),
            "--server-key",
            server_key,
        )
        s.edge(
            MODEL,
            assets["edge"],
            "edge1",
            "--curve-key",
            str(keys / "edge1.key_secret"),
            "--server-key",
            server_key,
        )
        s.wait_workers("edge", 1)
        yield Secure(s, keys, np.asarray(np.load(assets["input"])))


def requests_answered(s: Stack) -> int:
    return sum(r["count"] for r in s.status()["requests"])


def test_allowed_edge_registers_and_allowed_client_is_served(secure: Secure) -> None:
    with Client(secure.stack.address, timeout=15, curve=curve(secure.keys, "client1")) as client:
        for priority in (0, 1, 2):
            result = client.invoke(MODEL, secure.x, priority=priority)
            assert result.output.shape == (*secure.x.shape, 97)
            assert result.served_by["role"] == "edge" and result.served_by["worker"] == "edge1"


def test_edge_agent_not_on_the_allow_list_never_registers(secure: Secure) -> None:
    s = secure.stack
    deadline = time.monotonic() + 20
    while "serving" not in s.log("intruder-edge") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "serving" in s.log("intruder-edge"), s.log("intruder-edge")  # it has sent READY
    for _ in range(10):  # over 10 heartbeat intervals: only edge1, never the intruder
        assert s.workers("edge") == 1 and s.workers() == 1
        time.sleep(0.2)
    assert s.procs["intruder-edge"].poll() is None  # refused, not crashed


@pytest.mark.parametrize(
    "who", ["key not on the allow-list", "an allowed agent's key, wrong server key", "plain"]
)
def test_others_get_no_reply(secure: Secure, who: str) -> None:
    s = secure.stack
    if who == "plain":
        config = None
    elif who.startswith("key not"):
        config = curve(secure.keys, "intruder-client")
    else:
        config = curve(secure.keys, "client1", server="edge1")
    # The control: the same wait is long enough for an allowed client's answer, so a timeout
    # below is not a slow coordinator.
    with Client(s.address, timeout=REFUSED_WAIT_S, curve=curve(secure.keys, "client1")) as ok:
        assert ok.invoke(MODEL, secure.x).served_by["worker"] == "edge1"
    assert curve_handshake(s.address, curve(secure.keys, "client1")) == "accepted"
    # The refusal itself, as libzmq reports it on the peer's side: the allow-list refuses a
    # key it lacks; a peer with the wrong server key or none at all never completes one.
    handshake = curve_handshake(s.address, config, timeout=REFUSED_WAIT_S)
    if who.startswith("key not"):
        assert handshake == "refused"
    else:
        assert handshake in ("failed", "silent"), handshake
    before = requests_answered(s)
    with Client(s.address, timeout=REFUSED_WAIT_S, curve=config) as client:
        # The SDK watches the handshake (cicada/liveness.py): the request is never sent, and
        # the error says whose key to look at instead of waiting out the timeout.
        with pytest.raises(KeyRefused) as raised:
            client.invoke(MODEL, secure.x)
        expected = {"key": "allow-list", "an": "--server-key", "plain": "CURVE keys"}
        assert expected[who.split()[0]] in str(raised.value), raised.value
    assert requests_answered(s) == before  # the request never reached the coordinator
    assert s.status()["malformed"] == 0
    assert s.procs["coordinator"].poll() is None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_plaintext_tcp_peer_is_cut_off(secure: Secure) -> None:
    """Speak ZMTP 3.0 with the NULL mechanism (no encryption) on a bare TCP socket."""
    s = secure.stack
    before = requests_answered(s)
    signature = b"\xff" + b"\x00" * 8 + b"\x7f"
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as raw:
        raw.sendall(signature + b"\x03")
        greeting = _recv_exactly(raw, 64)
        assert greeting[0] == 0xFF and greeting[9] == 0x7F and greeting[10] == 3
        assert greeting[12:32] == b"CURVE".ljust(20, b"\x00")  # the server insists on CURVE
        raw.sendall(b"\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31)
        ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        frames = [bytes(f) for f in encode(Request("plain-tcp", MODEL, [secure.x]))]
        wire = bytes([0x04, len(ready)]) + ready
        for i, frame in enumerate(frames):
            more = 0x01 if i < len(frames) - 1 else 0x00
            wire += bytes([more | 0x02]) + len(frame).to_bytes(8, "big") + frame  # long frames
        rest = b""
        try:
            raw.sendall(wire)
            while chunk := raw.recv(4096):  # until the server closes the connection
                rest += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert rest == b"", rest  # not one byte after the greeting: no reply, no handshake
    time.sleep(0.3)
    assert requests_answered(s) == before
    assert s.status()["malformed"] == 0
    assert s.procs["coordinator"].poll() is None
    assert s.workers("edge") == 1


def test_refused_agent_registers_once_its_key_is_allowed(tmp_path: Path) -> None:
    assets = make_assets(tmp_path)
    keys, allow = tmp_path / "keys", tmp_path / "edge-keys"
    cicada_keys(keys, "coordinator", "edge1")
    allow.mkdir()
    secret = ("--curve-secret", str(keys / "coordinator.key_secret"),
              "--worker-keys", f"edge:{MODEL}:{allow}")  # fmt: skip
    with Stack(tmp_path) as s:
        s.coordinator(*secret)
        s.edge(
            MODEL,
            assets["edge"],
            "edge1",
            "--curve-key",
            str(keys / "edge1.key_secret"),
            "--server-key",
            str(keys / "coordinator.key"),
        )
        deadline = time.monotonic() + 20
        while "serving" not in s.log("edge1") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # refused: a few heartbeats go nowhere
        assert s.workers("edge") == 0
        s.kill("coordinator")
        shutil.copy(keys / "edge1.key", allow)  # the operator fixes the allow-list
        s.coordinator(*secret)
        s.wait_workers("edge", 1, timeout=15)  # liveness is 4 x 0.5 s: seconds at most
