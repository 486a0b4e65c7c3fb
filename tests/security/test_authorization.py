"""Authorization by role: the attacker's side, against real processes on loopback.

`python -m cicada coordinator|edge|cloud` (cicada.testing.Stack) with keys made by the real
`cicada keys`; the attacker is a bare DEALER socket speaking CCD/1 with whatever key it holds.
The promises checked (docs/PROTOCOL.md, sections 4 and 10):

* with CURVE, a client key may send REQUEST and CANCEL only: its READY is refused (naming
  `role`) and it is never sent anyone's request; a worker key registers only as the role and
  for the models it is bound to (a READY for another model is refused naming `models`, as
  the other role naming `role`), and its REQUEST is REJECTED;
* without CURVE the coordinator binds loopback only, unless told `--insecure`;
* a coordinator that launches its own cloud workers hands them the configured CURVE key pair:
  they register and serve (process launcher and warm pool);
* a READY out of bounds (capacity -5, NaN eta_s, negative compute_s, 4,096 models, a wrong
  type) is refused with the field named, while an honest client is served on; the worker
  runtime exits non-zero on a refusal instead of registering again;
* the metric series of a worker that left are gone.

Every request sent ends in exactly one outcome (counted). Waits are bounded; nothing asserts
how long anything took.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cicada.client import Client, CurveConfig
from cicada.common.protocol import (
    Disconnect,
    Dispatch,
    Heartbeat,
    Message,
    Ready,
    Reply,
    Request,
    Role,
    Status,
    decode,
    encode,
)
from cicada.common.sockets import CurveKeys, apply_curve_client, configure
from cicada.errors import ClientError
from cicada.testing import ROOT, Stack, free_port, make_assets

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")

MODEL = "gpt2"
WAIT_S = 30.0  # a bound on each wait for an answer, not a timing assertion
READY_WITHIN = 180.0  # a bound on a launched worker's cold start (torch import) on a busy box


def cicada_keys(out: Path, *names: str) -> None:
    args = [arg for name in names for arg in ("--name", name)]
    subprocess.run([sys.executable, "-m", "cicada", "keys", "--out", str(out), *args],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)  # fmt: skip


def client_curve(keys: Path, name: str) -> CurveConfig:
    loaded = CurveKeys.load(keys / f"{name}.key_secret", keys / "coordinator.key")
    assert loaded.server_public is not None
    return CurveConfig(loaded.server_public, loaded.public, loaded.secret)


class Peer:
    """A bare DEALER speaking CCD/1: what an attacker (or a worker) runs."""

    def __init__(self, address: str, keys: CurveKeys | None = None) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        configure(self.sock)
        apply_curve_client(self.sock, keys)
        self.sock.connect(address)

    def send(self, message: Message) -> None:
        self.sock.send_multipart(encode(message))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, skip_heartbeats: bool = True) -> Message:
        """The next message (the coordinator's periodic empty HEARTBEATs skipped), within a
        bound."""
        while True:
            if not self.sock.poll(int(WAIT_S * 1000)):
                raise AssertionError(f"no message within {WAIT_S} s")
            message = decode(self.sock.recv_multipart())
            if skip_heartbeats and isinstance(message, Heartbeat) and not message.registered:
                continue
            return message

    def pending(self) -> list[Message]:
        """Whatever has arrived already (no waiting), periodic HEARTBEATs left out."""
        out = []
        while self.sock.poll(0):
            message = decode(self.sock.recv_multipart())
            if not (isinstance(message, Heartbeat) and not message.registered):
                out.append(message)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


def refused_field(peer: Peer) -> str:
    answer = peer.recv()
    assert isinstance(answer, Disconnect), answer
    assert answer.refused, answer
    return answer.refused


def accepted(peer: Peer) -> bool:
    answer = peer.recv()
    return isinstance(answer, Heartbeat) and bool(answer.registered)


@dataclass
class Outcomes:
    """Requests sent and outcomes received, counted."""

    sent: int = 0
    received: int = 0

    def invoke(self, client: Client, x: np.ndarray, **kwargs: Any) -> Any:
        self.sent += 1
        try:
            result = client.invoke(MODEL, x, **kwargs)
        except ClientError as exc:
            self.received += 1
            return exc
        self.received += 1
        return result


# -- a CURVE coordinator with keys bound to roles --------------------------------------------


@dataclass
class Secure:
    stack: Stack
    keys: Path
    x: np.ndarray

    def peer(self, name: str) -> Peer:
        keys = CurveKeys.load(self.keys / f"{name}.key_secret", self.keys / "coordinator.key")
        return Peer(self.stack.address, keys)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    work = tmp_path_factory.mktemp("authorization")
    assets = make_assets(work)
    keys, clients = work / "keys", work / "clients"
    cicada_keys(keys, "coordinator", "edge1", "victim", "attacker")
    clients.mkdir()
    for name in ("victim", "attacker"):  # the attacker holds a client key: allow-listed
        shutil.copy(keys / f"{name}.key", clients)
    with Stack(work) as s:
        s.coordinator("--curve-secret", str(keys / "coordinator.key_secret"),
                      "--allow", str(clients),
                      "--worker-keys", f"edge:{MODEL}:{keys / 'edge1.key'}")  # fmt: skip
        s.edge(MODEL, assets["edge"], "edge1", "--curve-key", str(keys / "edge1.key_secret"),
               "--server-key", str(keys / "coordinator.key"))  # fmt: skip
        s.wait_workers("edge", 1)
        yield Secure(s, keys, np.asarray(np.load(assets["input"])))


def test_a_client_key_registering_as_a_worker_is_refused_and_gets_no_request(
    secure: Secure,
) -> None:
    s = secure.stack
    attacker = secure.peer("attacker")
    try:
        # The finding: a client's key registered as a fast cloud worker and was sent the
        # victims' requests. Now the READY is refused, naming the role it may not take.
        attacker.send(Ready(role=Role.CLOUD, worker="cloud1", models=[MODEL], compute_s=0.0001))
        assert refused_field(attacker) == "role"
        attacker.send(Ready(role=Role.EDGE, worker="edge-evil", models=[MODEL]))
        assert refused_field(attacker) == "role"
        outcomes = Outcomes()
        with Client(s.address, timeout=WAIT_S, curve=client_curve(secure.keys, "victim")) as c:
            results = [outcomes.invoke(c, secure.x, priority=p) for p in (1, 2)]
        assert outcomes.sent == outcomes.received == 2
        for result in results:
            assert not isinstance(result, ClientError), result
            assert result.served_by["worker"] == "edge1", result.served_by
        # Every request was answered by edge1, so none was dispatched to the attacker; and
        # nothing but the periodic heartbeats reached it.
        assert not any(isinstance(m, Dispatch) for m in attacker.pending())
        assert s.workers("cloud") == 0 and s.workers("edge") == 1
        # Its heartbeats do not make it a worker either: unknown, register again.
        attacker.send(Heartbeat())
        answer = attacker.recv()
        assert isinstance(answer, Disconnect) and not answer.refused
    finally:
        attacker.close()


def test_a_worker_key_registers_only_for_its_role_and_models(secure: Secure) -> None:
    s = secure.stack
    impostor = secure.peer("edge1")  # edge1's key: bound to edge for MODEL only
    try:
        impostor.send(Ready(role=Role.EDGE, worker="edge1-b", models=["other-model"]))
        assert refused_field(impostor) == "models"
        impostor.send(Ready(role=Role.EDGE, worker="edge1-b", models=[MODEL, "other-model"]))
        assert refused_field(impostor) == "models"
        impostor.send(Ready(role=Role.CLOUD, worker="edge1-b", models=[MODEL]))
        assert refused_field(impostor) == "role"
        # A worker key may not call models either: its REQUEST is answered REJECTED.
        impostor.send(Request(id="r1", model=MODEL, inputs=[secure.x]))
        reply = impostor.recv()
        assert isinstance(reply, Reply) and reply.id == "r1", reply
        assert reply.status is Status.REJECTED and "may not send requests" in reply.error
        # What it is bound to, it may do.
        impostor.send(Ready(role=Role.EDGE, worker="edge1-b", models=[MODEL]))
        assert accepted(impostor)
        s.wait_workers("edge", 2)
        impostor.send(Disconnect(reason="leaving"))
        s.wait_for(lambda st: sum(w["count"] for w in st["workers"]) == 1,
                   what="edge1-b gone", timeout=WAIT_S)  # fmt: skip
    finally:
        impostor.close()
    assert s.workers("cloud") == 0


# -- without CURVE ---------------------------------------------------------------------------


def coordinator_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cicada", "coordinator", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_non_loopback_bind_without_curve_is_refused_unless_insecure(tmp_path: Path) -> None:
    port = free_port()
    for bind in (f"tcp://0.0.0.0:{port}", f"tcp://*:{port}"):
        done = coordinator_run("--bind", bind, "--metrics", "off")
        assert done.returncode != 0
        assert "without CURVE" in done.stderr and "--insecure" in done.stderr, done.stderr
    config = tmp_path / "cicada.toml"
    config.write_text(f'[coordinator]\nbind = "tcp://0.0.0.0:{port}"\nmetrics = "off"\n')
    done = coordinator_run("--config", str(config))
    assert done.returncode != 0 and "without CURVE" in done.stderr, done.stderr
    # Said explicitly (flag or config), it binds and serves.
    for extra in (["--bind", f"tcp://0.0.0.0:{port}", "--insecure"], ["--config", str(config)]):
        if extra[0] == "--config":
            config.write_text(
                config.read_text().replace("[coordinator]\n", "[coordinator]\ninsecure = true\n")
            )
        with Stack(tmp_path, port=port) as s:
            s.start("coordinator", "coordinator", *extra, "--metrics",
                    f"127.0.0.1:{s.metrics_port}")  # fmt: skip
            s.wait_for(lambda st: True, what="the coordinator's metrics endpoint")
            with Client(s.address, timeout=WAIT_S) as client:
                outcome = Outcomes().invoke(client, np.zeros((1, 4), np.int64))
            assert isinstance(outcome, ClientError)  # nobody serves it: one outcome, an error
            s.stop()


# -- the lifecycle launches CURVE workers ----------------------------------------------------


@pytest.mark.parametrize("launcher", ["process", "pool"])
def test_the_lifecycle_launches_a_curve_cloud_worker_that_registers_and_serves(
    tmp_path: Path, tiny_package: dict[str, Path], launcher: str
) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    cicada_keys(keys, "coordinator", "cloud", "client1")
    clients.mkdir()
    shutil.copy(keys / "client1.key", clients)
    config = tmp_path / "cicada.toml"
    package = tiny_package["package"]
    config.write_text(f"""
[coordinator]
launcher = "{launcher}"
pool_socket = "{tmp_path}/pool.sock"
log_dir = "{tmp_path}/logs"
curve_secret = "{keys}/coordinator.key_secret"
clients = "{clients}"
worker_key = "{keys}/cloud.key_secret"

[models.{MODEL}]
package = "{package}"
max_workers = 1
start_timeout_s = {READY_WITHIN}
""")
    x = np.asarray(np.load(tiny_package["input"]))
    outcomes = Outcomes()
    with Stack(tmp_path) as s:
        s.coordinator("--config", str(config))
        with Client(s.address, timeout=READY_WITHIN,
                    curve=client_curve(keys, "client1")) as client:  # fmt: skip
            result = outcomes.invoke(client, x, priority=2)  # launches the worker, waits for it
        assert outcomes.sent == outcomes.received == 1
        assert not isinstance(result, ClientError), (result, s.log("coordinator"))
        assert result.served_by["role"] == "cloud", result.served_by
        assert result.served_by["worker"].startswith(f"{MODEL}-cloud-")


def test_a_curve_coordinator_that_launches_workers_needs_their_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    cicada_keys(keys, "coordinator", "client1")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "manifest.json").write_text("{}")
    config = tmp_path / "cicada.toml"
    config.write_text(f"""
[coordinator]
metrics = "off"
curve_secret = "{keys}/coordinator.key_secret"
clients = "{keys}"

[models.{MODEL}]
package = "{package}"
""")
    done = coordinator_run("--config", str(config))
    assert done.returncode != 0 and "worker_key" in done.stderr, done.stderr


# -- malformed READYs and metric series (an open coordinator: anyone may send READY) ----------


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, np.ndarray]]:
    work = tmp_path_factory.mktemp("bounds")
    assets = make_assets(work)
    with Stack(work) as s:
        s.coordinator()
        s.edge(MODEL, assets["edge"], "edge1")
        s.wait_workers("edge", 1)
        yield s, np.asarray(np.load(assets["input"]))


def ready_with(**fields: Any) -> Ready:
    base: dict[str, Any] = {"role": Role.CLOUD, "worker": "evil", "models": [MODEL]}
    return Ready(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"capacity": -5}, "capacity"),
        ({"capacity": 0}, "capacity"),
        ({"capacity": 10**9}, "capacity"),
        ({"eta_s": math.nan}, "eta_s"),
        ({"eta_s": math.inf}, "eta_s"),
        ({"compute_s": -0.5}, "compute_s"),
        ({"compute_s": math.nan}, "compute_s"),
        ({"models": [f"m{i}" for i in range(4096)]}, "models"),
        ({"models": []}, "models"),
        ({"models": ["x" * 10_000]}, "models"),
        ({"worker": "w" * 10_000}, "worker"),
        ({"resident_stages": -1}, "resident_stages"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_a_ready_out_of_bounds_is_refused_naming_the_field(
    open_stack: tuple[Stack, np.ndarray], fields: dict[str, Any], named: str
) -> None:
    s, x = open_stack
    peer = Peer(s.address)
    try:
        peer.send(ready_with(**fields))
        assert refused_field(peer) == named
        outcomes = Outcomes()
        with Client(s.address, timeout=WAIT_S) as client:
            result = outcomes.invoke(client, x, priority=2)  # would go to a cloud worker
        assert outcomes.sent == outcomes.received == 1
        assert not isinstance(result, ClientError), result
        assert result.served_by["worker"] == "edge1"
        assert s.workers("cloud") == 0
        assert not any(isinstance(m, Dispatch) for m in peer.pending())
    finally:
        peer.close()


def test_a_ready_of_the_wrong_type_is_refused_and_a_bad_heartbeat_unregisters(
    open_stack: tuple[Stack, np.ndarray],
) -> None:
    import msgpack

    s, _ = open_stack
    peer = Peer(s.address)
    try:
        body = {"role": "cloud", "worker": "evil", "models": [MODEL], "capacity": "lots"}
        peer.send_raw([b"CCD1", bytes([Ready.command]), msgpack.packb(body)])
        assert refused_field(peer) == "capacity"
        # Registered with honest values, then a heartbeat that lies: refused, unregistered.
        peer.send(ready_with(worker="liar", capacity=1))
        assert accepted(peer)
        s.wait_workers("cloud", 1)
        peer.send(Heartbeat(eta_s=math.nan))
        assert refused_field(peer) == "eta_s"
        s.wait_for(lambda st: not any(w["role"] == "cloud" for w in st["workers"]),
                   what="the liar unregistered", timeout=WAIT_S)  # fmt: skip
    finally:
        peer.close()


def metrics_text(s: Stack) -> str:
    with urllib.request.urlopen(s.metrics_url, timeout=WAIT_S) as r:
        return str(r.read().decode())


def test_the_metric_series_of_a_worker_that_left_are_gone(
    open_stack: tuple[Stack, np.ndarray],
) -> None:
    s, _ = open_stack
    peer = Peer(s.address)
    models = [MODEL, *(f"transient-model-{i}" for i in range(15))]
    try:
        peer.send(Ready(role=Role.CLOUD, worker="transient-worker", models=models,
                        resident_stages=1, total_stages=2, eta_s=1.0))  # fmt: skip
        assert accepted(peer)
        for _ in range(20):  # heartbeats with progress: its own gauges move
            peer.send(Heartbeat(resident_stages=1, total_stages=2, eta_s=0.5))
        s.wait_for(lambda st: any(w["role"] == "cloud" for w in st["workers"]),
                   what="the transient worker", timeout=WAIT_S)  # fmt: skip
        text = metrics_text(s)
        assert 'worker="transient-worker"' in text and 'model="transient-model-3"' in text
        peer.send(Disconnect(reason="leaving"))
        s.wait_for(lambda st: not any(w["role"] == "cloud" for w in st["workers"]),
                   what="the transient worker gone", timeout=WAIT_S)  # fmt: skip
    finally:
        peer.close()
    text = metrics_text(s)
    assert "transient-worker" not in text and "transient-model" not in text
    assert 'worker="edge1"' in text or 'model="gpt2"' in text  # the honest agent's stay


# -- the worker runtime on a refusal -----------------------------------------------------------


def test_a_refused_edge_agent_exits_non_zero_instead_of_looping(
    secure: Secure, tiny_package: dict[str, Path]
) -> None:
    """A real agent whose key is a client's: its READY is refused, it logs why and exits."""
    from cicada.common.worker import EXIT_REFUSED

    s = secure.stack
    proc = s.edge(MODEL, tiny_package["edge"], "refused-edge",
                  "--curve-key", str(secure.keys / "attacker.key_secret"),
                  "--server-key", str(secure.keys / "coordinator.key"))  # fmt: skip
    try:
        code = proc.wait(READY_WITHIN)
    finally:
        s.procs.pop("refused-edge", None)
    assert code == EXIT_REFUSED, s.log("refused-edge")
    assert "refused the registration (role)" in s.log("refused-edge")
    assert s.workers("edge") == 1
