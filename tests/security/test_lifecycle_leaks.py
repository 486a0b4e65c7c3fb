"""Lifecycle leaks closed: what outlives, overwrites or exhausts, tried as an attacker would,
on real processes.

* A SIGKILLed coordinator takes its warm pool and the workers it launched with it (the
  parent-death signal, common/launch.py `die_with_parent`); a SIGKILLed pool takes its forked
  workers.
* The pool refuses a launch spec with nonsense types or values, and a name that would put a
  log outside its log folder: nothing is forked, no file is written.
* A connection to the pool that says nothing does not hold up anybody else's launch, and the
  pool closes it after its read timeout.
* `cicada keys` never writes through a file or link someone placed at a key's name, and a
  secret key file is 0600 (with --force the placed file is replaced, not written into).
* 400 idle connections to the coordinator's /metrics neither keep a real GET out nor hold a
  thread each, and are closed after the idle timeout (common/httpd.py).
* The cloud worker's health endpoint binds loopback unless told otherwise.

Every wait is bounded (a generous bound, polled); nothing here asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cicada.common.launch import LaunchError, PoolLauncher, WorkerSpec, pool_call
from cicada.testing import ROOT, Stack, free_port, process_cmdline, process_running

BOUND_S = 60.0  # how long a wait may last at most: generous, for a loaded machine


def wait_until(predicate: Callable[[], bool], what: str, bound: float = BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, f"waited {bound} s for {what}"
        time.sleep(0.1)


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def spec(package: Path, name: str, log_dir: Path | None = None,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A launch spec, on the wire. The coordinator address has nobody behind it: a worker
    forked from it stays up, trying to register, until it is killed."""
    doc: dict[str, Any] = WorkerSpec(
        model="gpt2", package=str(package), name=name, heartbeat=0.2,
        coordinator=f"tcp://127.0.0.1:{free_port()}",
        log_dir=str(log_dir) if log_dir is not None else None,
    ).to_wire()  # fmt: skip
    return {**doc, **(extra or {})}


# -- the coordinator's processes die with it ---------------------------------------------------


@pytest.mark.parametrize("launcher", ["pool", "process"])
def test_a_sigkilled_coordinator_takes_its_pool_and_workers_with_it(
    tmp_path: Path, tiny_package: dict[str, Path], launcher: str
) -> None:
    (tmp_path / "logs").mkdir()
    config = tmp_path / "cicada.toml"
    config.write_text(
        f'[coordinator]\nlauncher = "{launcher}"\nlog_dir = "logs"\npool_socket = "pool.sock"\n'
        f'[models.gpt2]\npackage = "{tiny_package["package"]}"\n'
        "min_workers = 1\nkeep_alive_s = 600.0\nstart_timeout_s = 600.0\n"
    )
    seen: set[int] = set()
    with Stack(tmp_path) as stack:
        proc = stack.coordinator("--config", str(config))
        coord = psutil.Process(proc.pid)
        want = 2 if launcher == "pool" else 1  # (the pool and) one prewarmed worker

        def descendants() -> list[psutil.Process]:
            kids = [k for k in coord.children(recursive=True) if process_running(k)]
            seen.update(k.pid for k in kids)
            return kids

        try:
            wait_until(lambda: len(descendants()) >= want, f"{want} processes under the "
                       f"coordinator; log: {stack.log('coordinator')}")  # fmt: skip
            kids = descendants()
            if launcher == "pool":
                (pool,) = [k for k in kids if k.ppid() == coord.pid]
                assert "pool" in process_cmdline(pool)
                assert any(k.ppid() == pool.pid for k in kids), "no worker forked by the pool"
            os.kill(proc.pid, signal.SIGKILL)  # the coordinator only, not its process group
            proc.wait(30)
            wait_until(lambda: not any(process_running(k) for k in kids),
                       f"the coordinator's processes {[k.pid for k in kids]} to end")  # fmt: skip
            assert [k.pid for k in kids if process_running(k)] == []
        finally:
            kill_all({pid for pid in seen if pid != proc.pid})
    assert not (tmp_path / "pool.sock").exists() or launcher == "process"


def start_pool(work: Path) -> Iterator[PoolLauncher]:
    """A warm pool started as the coordinator starts one (logs in work/logs)."""
    launcher = PoolLauncher(str(work / "pool.sock"), log_dir=str(work / "logs"))
    launcher.start(timeout=BOUND_S)
    assert launcher._pool is not None
    pool_pid = launcher._pool.pid
    try:
        yield launcher
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            kill_all({k.pid for k in psutil.Process(pool_pid).children(recursive=True)})
        launcher.close()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[PoolLauncher]:
    yield from start_pool(tmp_path)


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolLauncher]:
    """One pool for the refusals (a refused spec changes nothing in it, which they check)."""
    yield from start_pool(tmp_path_factory.mktemp("pool"))


def test_a_sigkilled_pool_takes_its_forked_workers_with_it(
    pool: PoolLauncher, tiny_package: dict[str, Path], tmp_path: Path
) -> None:
    handle = pool.launch(WorkerSpec.from_wire(spec(tiny_package["package"], "w-1",
                                                   tmp_path / "logs")))  # fmt: skip
    worker = psutil.Process(handle.pid)
    try:
        assert pool._pool is not None and worker.ppid() == pool._pool.pid
        os.kill(pool._pool.pid, signal.SIGKILL)
        pool._pool.wait(30)
        wait_until(lambda: not process_running(worker), "the forked worker to end")
        assert not process_running(worker)
    finally:
        kill_all({handle.pid})


# -- what the pool accepts --------------------------------------------------------------------


NONSENSE = [
    {"threads": "lots"},
    {"threads": 10**9},
    {"threads": 0},
    {"threads": True},
    {"row_invariant": "sometimes"},
    {"row_invariant": 1},
    {"heartbeat": "often"},
    {"heartbeat": -1.0},
    {"heartbeat": float("nan")},
    {"heartbeat": float("inf")},
    {"device": ["cuda"]},
    {"device": "cuda; rm -rf /"},
    {"model": 5},
    {"model": ""},
    {"package": {"a": 1}},
    {"coordinator": None},
    {"curve_key": 7},
    {"log_dir": 3},
    {"name": 12},
    {"name": "x" * 200},
    {"name": "nul\x00name"},
    {"evil": "field"},
]
ESCAPES = ["../escape", "../../escape", "a/b", "..", ".", "x/../../escape", "/tmp/escape",
           ".hidden", "a..b", ""]  # fmt: skip


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir() and not p.name.startswith("pool.sock")}


def refused(pool: PoolLauncher, doc: dict[str, Any], match: str) -> None:
    """The pool refuses `doc`, forks nothing, writes nothing, and serves on."""
    work = Path(pool.socket_path).parent
    before = files_under(work.parent)
    with pytest.raises(LaunchError, match=match):
        pool_call(pool.socket_path, {"op": "launch", "spec": doc})
    assert pool._pool is not None
    assert psutil.Process(pool._pool.pid).children() == []  # nothing was forked
    assert files_under(work.parent) == before  # nothing was written, here or next to it
    assert pool_call(pool.socket_path, {"op": "ping"})["ok"]


def test_the_pool_refuses_a_spec_with_nonsense_types_or_values(
    shared_pool: PoolLauncher, tiny_package: dict[str, Path]
) -> None:
    logs = Path(shared_pool.socket_path).parent / "logs"
    for bad in NONSENSE:
        refused(shared_pool, spec(tiny_package["package"], "w-1", logs, bad), "bad worker spec")
    for doc in (None, [1, 2], "launch", {}):
        refused(shared_pool, doc, "worker spec")  # type: ignore[arg-type]


def test_the_pool_refuses_a_name_that_leaves_its_log_folder(
    shared_pool: PoolLauncher, tiny_package: dict[str, Path]
) -> None:
    logs = Path(shared_pool.socket_path).parent / "logs"
    (logs / "a").mkdir(exist_ok=True)  # so that a/b.log could have been written
    for name in ESCAPES:
        refused(shared_pool, spec(tiny_package["package"], name, logs), "bad worker spec")
    assert not Path("/tmp/escape.log").exists()


def test_the_pool_writes_logs_only_into_its_own_folder(
    pool: PoolLauncher, tiny_package: dict[str, Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    doc = spec(tiny_package["package"], "w-1", elsewhere)
    with pytest.raises(LaunchError, match="log_dir"):
        pool_call(pool.socket_path, {"op": "launch", "spec": doc})
    assert not elsewhere.exists()
    assert pool._pool is not None
    assert psutil.Process(pool._pool.pid).children() == []


def test_a_silent_connection_does_not_block_a_launch_and_is_closed(
    pool: PoolLauncher, tiny_package: dict[str, Path], tmp_path: Path
) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handle = None
    try:
        silent.connect(pool.socket_path)  # says nothing at all
        half.connect(pool.socket_path)
        half.sendall(struct.pack("<I", 100) + b"0123456789")  # a frame's head, then stalls
        handle = pool.launch(WorkerSpec.from_wire(spec(tiny_package["package"], "real-1",
                                                       tmp_path / "logs")))  # fmt: skip
        # Answered while both stalled connections are still open: they blocked nothing.
        for s in (silent, half):
            with pytest.raises(BlockingIOError):
                s.recv(1, socket.MSG_DONTWAIT)
        assert pool._pool is not None
        assert psutil.Process(handle.pid).ppid() == pool._pool.pid
        wait_until(lambda: (tmp_path / "logs" / "real-1.log").exists(), "the worker's log")
        # ... and the pool closes them after its read timeout.
        for s in (silent, half):
            s.settimeout(BOUND_S)
            assert s.recv(1) == b""
        assert pool_call(pool.socket_path, {"op": "ping"})["ok"]
    finally:
        silent.close()
        half.close()
        if handle is not None:
            handle.kill()


# -- cicada keys --------------------------------------------------------------------------------


def run_keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cicada", "keys", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=120, umask=0,  # umask 0: the mode comes from the code alone
    )  # fmt: skip


def test_keys_are_written_0600_and_load(tmp_path: Path) -> None:
    import zmq.auth

    done = run_keys("--out", str(tmp_path / "keys"), "--name", "edge1")
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "keys" / "edge1.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    public, secret_key = zmq.auth.load_certificate(str(secret))
    assert secret_key is not None
    assert zmq.auth.load_certificate(str(tmp_path / "keys" / "edge1.key")) == (public, None)


@pytest.mark.parametrize("planted", ["file", "link"])
def test_keys_refuse_a_file_placed_at_a_keys_name(tmp_path: Path, planted: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    secret = keys / "edge1.key_secret"
    target = tmp_path / "target"
    target.write_text("planted")
    target.chmod(0o644)
    if planted == "file":
        secret.write_text("planted")
        secret.chmod(0o644)
    else:
        secret.symlink_to(target)
    done = run_keys("--out", str(keys), "--name", "edge1")
    assert done.returncode != 0
    assert "--force" in done.stderr
    assert secret.read_text() == "planted"  # untouched, and no secret went into it
    assert target.read_text() == "planted"
    assert not (keys / "edge1.key").exists()


@pytest.mark.parametrize("planted", ["file", "link"])
def test_keys_force_replaces_a_placed_file_instead_of_writing_into_it(
    tmp_path: Path, planted: str
) -> None:
    import zmq.auth

    keys = tmp_path / "keys"
    keys.mkdir()
    secret = keys / "edge1.key_secret"
    target = tmp_path / "target"
    target.write_text("planted")
    if planted == "file":
        secret.write_text("planted")
        secret.chmod(0o644)
    else:
        secret.symlink_to(target)
    with open(secret) as held:  # someone holds the placed file open
        done = run_keys("--out", str(keys), "--name", "edge1", "--force")
        assert done.returncode == 0, done.stderr
        assert held.read() == "planted"  # the secret never went into their file
    assert not secret.is_symlink()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert zmq.auth.load_certificate(str(secret))[1] is not None
    assert target.read_text() == "planted"
    assert [p.name for p in keys.iterdir() if p.name.startswith(".")] == []  # no temp left


# -- HTTP endpoints ---------------------------------------------------------------------------


def http_get(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=BOUND_S) as r:
        r.read()
        return int(r.status)


def test_idle_connections_do_not_exhaust_the_metrics_endpoint(stack: Stack) -> None:
    proc = stack.coordinator()
    coord = psutil.Process(proc.pid)
    threads_before = coord.num_threads()
    idle = [socket.create_connection(("127.0.0.1", stack.metrics_port), timeout=BOUND_S)
            for _ in range(400)]  # fmt: skip
    try:
        half = idle[-1]
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a request that never ends
        assert http_get(stack.metrics_url) == 200  # a real GET still answers
        # Idle connections cost a descriptor, not a thread.
        assert coord.num_threads() < threads_before + 50, (threads_before, coord.num_threads())
        # ... and every one of them is closed: the oldest to make room, the rest on timeout.
        for s in idle:
            s.settimeout(BOUND_S)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""
        assert http_get(stack.metrics_url) == 200
    finally:
        for s in idle:
            s.close()


def test_the_health_endpoint_binds_loopback_by_default(
    stack: Stack, tiny_package: dict[str, Path]
) -> None:
    port = free_port()
    proc = stack.cloud("gpt2", tiny_package["package"], "cloud", "--health-port", str(port))
    worker = psutil.Process(proc.pid)

    def listening() -> list[Any]:
        try:
            conns = worker.net_connections(kind="tcp")
        except psutil.Error:
            return []
        return [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]

    wait_until(lambda: bool(listening()) or proc.poll() is not None,
               "the health endpoint to listen")  # fmt: skip
    assert proc.poll() is None, stack.log("cloud")
    assert [c.laddr.ip for c in listening()] == ["127.0.0.1"]
    assert http_get(f"http://127.0.0.1:{port}/healthz") == 200
