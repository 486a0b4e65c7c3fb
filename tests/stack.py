"""Real processes on loopback for tests and benchmarks: coordinator, edge agents, cloud workers.

Every process is started with `python -m cicada ...` exactly as a user would, on free ports,
and killed (with its whole process group) when the `Stack` closes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    with socket.socket() as s:
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
    heartbeat: float = 0.2
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "cicada", *args], cwd=ROOT, stdout=log, stderr=log,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def coordinator(self, *extra: str) -> subprocess.Popen[bytes]:
        proc = self._start(
            "coordinator", "coordinator", "--bind", self.address,
            "--metrics", f"127.0.0.1:{self.metrics_port}", "--heartbeat", str(self.heartbeat),
            *extra,
        )  # fmt: skip
        self.wait_for(lambda s: True, what="coordinator metrics endpoint")
        return proc

    def edge(self, model: str, edge_dir: Path, name: str = "edge", *extra: str) -> Any:
        return self._start(name, "edge", "--model", model, "--onnx", str(edge_dir),
                           "--coordinator", self.address, "--name", name,
                           "--heartbeat", str(self.heartbeat), *extra)  # fmt: skip

    def cloud(self, model: str, package: Path, name: str = "cloud", *extra: str) -> Any:
        return self._start(name, "cloud", "--model", model, "--package", str(package),
                           "--coordinator", self.address, "--name", name,
                           "--heartbeat", str(self.heartbeat), *extra)  # fmt: skip

    def status(self) -> dict[str, Any]:
        from cicada.edge.status import fetch_status

        return fetch_status(self.metrics_url, timeout=2.0)

    def workers(self, role: str | None = None, state: str | None = None) -> int:
        try:
            snapshot = self.status()
        except Exception:
            return 0
        return sum(
            w["count"] for w in snapshot["workers"]
            if (role is None or w["role"] == role) and (state is None or w["state"] == state)
        )  # fmt: skip

    def wait_for(self, predicate: Any, what: str, timeout: float = 60.0) -> None:
        """Poll until predicate(status) holds; a bounded wait for a condition, not a timing
        assertion."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return
            except Exception as exc:
                last = exc
            for name, proc in self.procs.items():
                if proc.poll() is not None and name == "coordinator":
                    raise RuntimeError(f"coordinator exited: {self.log('coordinator')}")
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {what}; last status: {last}")

    def wait_workers(self, role: str, count: int = 1, state: str | None = None,
                     timeout: float = 60.0) -> None:  # fmt: skip
        self.wait_for(
            lambda s: sum(w["count"] for w in s["workers"] if w["role"] == role
                          and (state is None or w["state"] == state)) >= count,
            what=f"{count} {role} worker(s) {state or ''}", timeout=timeout,
        )  # fmt: skip

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(30)

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


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))
