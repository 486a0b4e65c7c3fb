"""`cicada pool`: a warm pool that forks cloud workers with torch already imported.

SOCK and Catalyzer's lesson: most of a cold start before the weights is interpreter start and
imports (`import torch` alone ~1.25 s here). The pool pays that once, ahead of demand, then
forks a worker per launch request (~tens of ms). The pool itself never runs a torch op or
starts a thread before forking, so the children inherit no thread state (fork-safe). Nor may it
initialise CUDA: a forked child cannot use its parent's CUDA context (the first CUDA call fails
or hangs), so a pool whose process has initialised CUDA refuses every launch by name
(`check_fork_safe`) instead of handing out broken workers.

Requests arrive on a unix socket as length-prefixed msgpack maps (common/launch.py); a launch
request's spec is checked (types, ranges, a name that cannot leave the log folder) before
anything is forked. Started by a coordinator's PoolLauncher, the pool dies with that
coordinator (parent-death signal, and a check of its parent on every turn of its loop), and
every forked worker dies with the pool: nothing outlives a SIGKILLed coordinator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cicada.cloud import collector
from cicada.common.launch import (
    MAX_POOL_MESSAGE,
    LaunchError,
    WorkerSpec,
    die_with_parent,
    frame_size,
    open_log,
    unpack_frame,
    worker_log_path,
    write_frame,
)
from cicada.common.signals import StopRequest

log = logging.getLogger("cicada.pool")

READ_TIMEOUT_S = 5.0  # a connection must deliver its whole request within this
MAX_CONNECTIONS = 64  # held at once; a new one beyond this drops the oldest


def _child(spec: WorkerSpec, log_path: Path | None, pool: int) -> int:
    """Runs in the forked child: become a cloud worker that dies with the pool."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent(pool)  # a fork does not inherit the pool's own parent-death signal
    fd = open_log(log_path) if log_path is not None else os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from cicada.cloud.service import CloudWorker, CloudWorkerConfig

    worker = CloudWorker(CloudWorkerConfig.from_spec(spec))
    return worker.serve_forever()


def preload(package_dirs: list[str], trusted: list[str] | None = None) -> list[str]:
    """Import what the packages' factories need (a transformers model's library and class,
    ~2.5 s) so that a forked worker does not. Returns the modules loaded; a package that
    cannot be read is logged and skipped: the worker will say what is wrong with it. Only
    allow-listed factories are imported, but for the packages in `trusted`."""
    import importlib

    from cicada.cloud.miniloader import resolve_factory
    from cicada.common.errors import CicadaError
    from cicada.common.package import Manifest

    loaded: list[str] = []
    trusted = list(trusted or [])
    for package in [*package_dirs, *trusted]:
        try:
            arch = Manifest.load(Path(package)).architecture
            resolve_factory(arch.factory, trusted=package in trusted)
            module = importlib.import_module(arch.factory.partition(":")[0])
            hook = getattr(module, "cicada_preload", None)
            loaded += hook(arch.config) if callable(hook) else [module.__name__]
        except (CicadaError, ImportError, AttributeError, TypeError) as exc:
            log.warning("cannot preload for %s: %s", package, exc)
    return sorted(set(loaded))


@dataclass
class _Conn:
    """A client connection: what it sent so far and when it must have sent a whole frame."""

    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


def serve_pool(
    socket_path: str,
    preload_packages: list[str] | None = None,
    trusted_packages: list[str] | None = None,
    log_dir: str | None = None,
    parent: int | None = None,
) -> None:
    """Serve launch requests on `socket_path` until SIGTERM, or until `parent` (the launcher
    that started the pool) is gone. Worker logs go to `log_dir` only.

    One thread, one selector: connections are read without blocking, each must deliver its
    request within READ_TIMEOUT_S (else it is closed), and a silent one never delays
    another. At most MAX_CONNECTIONS are held; beyond that the oldest is dropped. Forks happen
    on this thread, which never ends before the pool does (the forked workers' parent-death
    signal follows it)."""
    # Pay for the imports now, before any request: this is what the pool is for. Frozen
    # afterwards (cloud/collector.py): no forked worker's collection walks them again, nor
    # writes to their pages (copy-on-write).
    with collector.quiet_import():
        import torch  # noqa: F401

        import cicada.cloud.pipeline
        import cicada.cloud.service
        import cicada.common.worker  # noqa: F401

    preloaded = preload(preload_packages or [], trusted_packages)
    logs = Path(log_dir).resolve() if log_dir else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)

    children: dict[int, int | None] = {}  # pid -> exit code once reaped

    def reap(*_: object) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children[pid] = os.waitstatus_to_exitcode(status)

    signal.signal(signal.SIGCHLD, reap)
    stop = StopRequest()  # lock-free, as every role's (common/signals.py)
    stop.on_signals(signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    os.chmod(socket_path, 0o600)  # only this user may ask for workers
    server.listen(16)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    conns: dict[socket.socket, _Conn] = {}  # oldest first

    def drop(sock: socket.socket) -> None:
        conns.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)
        sock.close()

    def answer(conn: _Conn, request: dict[str, Any] | None, error: str | None) -> None:
        reply: dict[str, Any]
        if request is None:
            reply = {"ok": False, "error": error}
        else:
            try:
                reply = _answer(request, children, preloaded, logs)
            except LaunchError as exc:
                reply = {"ok": False, "error": str(exc)}
        if "fork" in reply:
            spec, log_path = reply["fork"]
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    selector.close()  # closes this copy only: the pool's registrations stay
                    server.close()
                    for other in conns:
                        other.close()
                    conn.sock.close()
                    code = _child(spec, log_path, pool_pid)
                finally:
                    os._exit(code)
            children.setdefault(pid, None)  # the child may have been reaped already
            reply = {"ok": True, "pid": pid}
        with contextlib.suppress(OSError):
            conn.sock.settimeout(1.0)  # a reply is a few bytes: the socket buffer takes it
            write_frame(conn.sock, reply)
        drop(conn.sock)

    pool_pid = os.getpid()
    log.info("warm pool ready on %s (pid %d)", socket_path, pool_pid)
    try:
        while not stop.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("the process that started the pool (%d) is gone: stopping", parent)
                break
            events = selector.select(0.2)
            now = time.monotonic()
            for key, _ in events:
                if key.fileobj is server:
                    _accept(server, selector, conns, now, drop)
                    continue
                conn = conns.get(key.fileobj)  # type: ignore[call-overload]
                if conn is None:
                    continue
                try:
                    chunk = conn.sock.recv(MAX_POOL_MESSAGE + 4 - len(conn.buf))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    drop(conn.sock)
                    continue
                conn.buf += chunk
                if len(conn.buf) < 4:
                    continue
                try:
                    size = frame_size(bytes(conn.buf[:4]))
                    if len(conn.buf) < 4 + size:
                        continue
                    request = unpack_frame(bytes(conn.buf[4 : 4 + size]))
                except LaunchError as exc:
                    answer(conn, None, str(exc))
                    continue
                answer(conn, request, None)
            for sock, conn in list(conns.items()):
                if now > conn.deadline:
                    log.info("closing a pool connection silent for %.0f s", READ_TIMEOUT_S)
                    drop(sock)
    finally:
        for sock in list(conns):
            drop(sock)
        selector.close()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        for pid, exit_code in children.items():
            if exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


def check_fork_safe() -> None:
    """Raise LaunchError if this process has initialised CUDA: its forks would inherit a CUDA
    context they cannot use."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise LaunchError(
            "the warm pool cannot fork a worker: CUDA was initialised in the pool process, and "
            "a forked child cannot use its parent's CUDA context; keep the pool free of CUDA "
            "calls (preload imports only) or start workers without the pool"
        )


def _accept(
    server: socket.socket,
    selector: selectors.BaseSelector,
    conns: dict[socket.socket, _Conn],
    now: float,
    drop: Any,
) -> None:
    while True:
        try:
            sock, _ = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors: the oldest connection makes room
            log.warning("cannot accept a pool connection: %s", exc)
            if conns:
                drop(next(iter(conns)))
            return
        if len(conns) >= MAX_CONNECTIONS:
            drop(next(iter(conns)))
        sock.setblocking(False)
        conns[sock] = _Conn(sock, now + READ_TIMEOUT_S)
        selector.register(sock, selectors.EVENT_READ)


def _answer(
    request: dict[str, Any],
    children: dict[int, int | None],
    preloaded: list[str],
    logs: Path | None,
) -> dict[str, Any]:
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid(), "preloaded": preloaded}
    if op == "status":
        pid = request.get("pid")
        if not isinstance(pid, int) or pid not in children:
            return {"ok": False, "error": f"no worker with pid {pid!r} from this pool"}
        return {"ok": True, "alive": children[pid] is None, "exit_code": children[pid]}
    if op == "launch":
        spec = WorkerSpec.from_wire(request.get("spec"))  # types, ranges, a confined name
        log_path = None
        if spec.log_dir is not None:
            if logs is None or Path(spec.log_dir).resolve() != logs:
                raise LaunchError(
                    f"bad worker spec: log_dir {spec.log_dir!r}: this pool writes worker logs "
                    + (f"only into {logs}" if logs else "nowhere (started without --log-dir)")
                )
            log_path = worker_log_path(logs, spec.name)
        check_fork_safe()
        return {"fork": (spec, log_path)}
    return {"ok": False, "error": f"unknown op {op!r}"}
