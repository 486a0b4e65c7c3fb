"""Real processes on loopback for tests, benchmarks and `cicada demo`: coordinator, edge
agents, cloud workers.

Every process is started with `python -m cicada ...` exactly as a user would, on free ports,
and killed (with its whole process group) when the `Stack` closes; `stop` asks them to drain
first (SIGTERM, workers before the coordinator).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from cicada.common.errors import CicadaError

# The directory that holds the `cicada` package: the repository root in a checkout.
ROOT = Path(__file__).resolve().parents[2]


class StackError(CicadaError, RuntimeError):
    """A process of the stack exited while a wait watched it."""


class StackTimeout(CicadaError, TimeoutError):
    """A bounded wait for the stack's status ran out."""


def process_running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a child nobody has reaped yet still 'is running')."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback TCP port that is free now, chosen below the kernel's ephemeral range.

    The kernel hands ephemeral ports to every outgoing connection (ZeroMQ connects, HTTP
    polls), so a port picked with bind(0) and bound by a process a moment later can be taken
    in between by some connection's local end. Random ports below that range are never given
    out implicitly; only another explicit pick can collide, which the bind check and the
    coordinator's start-up retry (Stack.coordinator) cover."""
    low = _ephemeral_range()[0]
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every pick taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_gpt2_config() -> dict[str, Any]:
    from cicada.cloud.models import gpt2

    return gpt2.tiny_config()


def make_assets(work: Path, config: dict[str, Any] | None = None) -> dict[str, Path]:
    """Pack a tiny GPT-2, export its edge model, save an example input. Returns the paths."""
    import numpy as np

    from cicada.cloud.export_edge import export_edge
    from cicada.cloud.models import gpt2
    from cicada.cloud.packing import pack

    config = config or tiny_gpt2_config()
    package, edge_dir, x = work / "pkg", work / "edge", work / "x.npy"
    if not package.exists():
        pack("cicada.cloud.models.gpt2:build", package, config=config)
    if not edge_dir.exists():
        export_edge(package, edge_dir)
    np.save(x, gpt2.example_input(config).numpy())
    return {"package": package, "edge": edge_dir, "input": x}


@dataclass
class Stack:
    work: Path
    # A silent peer is dead after 4 intervals: 2 s, which a busy 2-core CI machine can starve a
    # process for well past 0.8 s (a 0.2 s heartbeat dropped an edge agent mid-drain there).
    heartbeat: float = 0.5
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Where the processes run: the repository root by default (so `python -m cicada` finds
    # this checkout), None for the caller's own directory (relative paths stay valid).
    cwd: Path | None = ROOT
    # False: only the coordinator's exit fails a wait (tests kill workers on purpose);
    # True: any process's exit does.
    fail_fast: bool = False

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`python -m cicada *args` in its own process group, logging to `<work>/<name>.log`."""
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "cicada", *args], cwd=self.cwd, stdout=log, stderr=log,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def coordinator(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start the coordinator and wait for its metrics endpoint. A port taken between the
        pick and the bind (another test's pick) is retried on fresh ports, a bounded number of
        times; any other start-up failure raises."""
        for attempt in range(3):
            proc = self.start(
                "coordinator", "coordinator", "--bind", self.address,
                "--metrics", f"127.0.0.1:{self.metrics_port}", "--heartbeat",
                str(self.heartbeat), *extra,
            )  # fmt: skip
            try:
                self.wait_for(lambda s: True, what="coordinator metrics endpoint")
                return proc
            except StackError:
                if attempt == 2 or "in use" not in self.log("coordinator").lower():
                    raise
                del self.procs["coordinator"]
                self.port, self.metrics_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def edge(self, model: str, edge_dir: Path, name: str = "edge", *extra: str) -> Any:
        return self.start(name, "edge", "--model", model, "--onnx", str(edge_dir),
                           "--coordinator", self.address, "--name", name,
                           "--heartbeat", str(self.heartbeat), *extra)  # fmt: skip

    def cloud(self, model: str, package: Path, name: str = "cloud", *extra: str) -> Any:
        return self.start(name, "cloud", "--model", model, "--package", str(package),
                           "--coordinator", self.address, "--name", name,
                           "--heartbeat", str(self.heartbeat), *extra)  # fmt: skip

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        from cicada.edge.coordinator.status import fetch_status

        return fetch_status(self.metrics_url, timeout=timeout)

    def workers(self, role: str | None = None, state: str | None = None) -> int:
        """How many workers of `role` (in `state`) the coordinator reports now. Raises when its
        metrics cannot be read: an unreachable coordinator is not "no workers"."""
        snapshot = self.status()
        return sum(
            w["count"] for w in snapshot["workers"]
            if (role is None or w["role"] == role) and (state is None or w["state"] == state)
        )  # fmt: skip

    def wait_for(self, predicate: Any, what: str, timeout: float = 60.0,
                 poll_timeout: float = 2.0) -> dict[str, Any]:  # fmt: skip
        """Poll until predicate(status) holds and return that status; a bounded wait for a
        condition, not a timing assertion."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.fail_fast:
                self._check_exits(self.procs)
            try:
                last = self.status(timeout=poll_timeout)
                if predicate(last):
                    return dict(last)
            except Exception as exc:
                last = exc
            self._check_exits({k: p for k, p in self.procs.items() if k == "coordinator"})
            time.sleep(0.05)
        raise StackTimeout(f"waited {timeout} s for {what}; last status: {last}")

    def _check_exits(self, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise StackError(f"{name} exited: {self.log(name)}")

    def wait_workers(self, role: str, count: int = 1, state: str | None = None,
                     timeout: float = 60.0) -> None:  # fmt: skip
        self.wait_for(
            lambda s: sum(w["count"] for w in s["workers"] if w["role"] == role
                          and (state is None or w["state"] == state)) >= count,
            what=f"{count} {role} worker(s) {state or ''}", timeout=timeout,
        )  # fmt: skip

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop(self, grace: float = 10.0) -> None:
        """Drain: SIGTERM every process (workers first, the coordinator last), SIGKILL what
        has not exited `grace` seconds later."""
        procs = list(self.procs.items())
        self.procs.clear()
        for _, proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def curve_handshake(address: str, curve: Any | None, timeout: float = 10.0) -> str:
    """How a CURVE coordinator at `address` receives a peer with `curve`'s keys (a
    `cicada.client.CurveConfig`; None: a plain peer), as libzmq reports it on the peer's side:
    "accepted" (handshake done), "refused" (the coordinator's allow-list said no), "failed"
    (another handshake failure), or "silent" (no outcome within `timeout`: a bounded wait).
    Tells a refusal from a reply that is merely slow."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    outcomes: dict[int, str] = {
        zmq.EVENT_HANDSHAKE_SUCCEEDED: "accepted",
        zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
    }
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey = _key(curve.server_public_key)
        sock.curve_publickey = _key(curve.public_key)
        sock.curve_secretkey = _key(curve.secret_key)
    monitor = sock.get_monitor_socket(sum(outcomes))  # distinct bits: the sum is the mask
    try:
        sock.connect(address)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if monitor.poll(int(left * 1000) + 1):
                seen = int(recv_monitor_message(monitor)["event"])
                if seen in outcomes:
                    return outcomes[seen]
        return "silent"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def _key(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))
