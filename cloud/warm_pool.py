"""`cicada pool`: a warm pool that forks cloud workers with torch already imported.

SOCK and Catalyzer's lesson: most of a cold start before the weights is interpreter start and
imports (`import torch` alone ~1.25 s here). The pool pays that once, ahead of demand, then
forks a worker per launch request (~tens of ms). The pool itself never runs a torch op or
starts a thread before forking, so the children inherit no thread state (fork-safe).

Requests arrive on a unix socket as length-prefixed msgpack maps (common/launch.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("cicada.pool")


def _child(spec_doc: dict[str, Any]) -> int:
    """Runs in the forked child: become a cloud worker."""
    from cicada.common.launch import WorkerSpec

    spec = WorkerSpec.from_wire(spec_doc)
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if spec.log_dir:
        Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(
            Path(spec.log_dir) / f"{spec.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
    else:
        fd = os.open(os.devnull, os.O_WRONLY)
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


def serve_pool(
    socket_path: str,
    preload_packages: list[str] | None = None,
    trusted_packages: list[str] | None = None,
) -> None:
    # Pay for the imports now, before any request: this is what the pool is for.
    import torch  # noqa: F401

    import cicada.cloud.pipeline
    import cicada.cloud.service
    import cicada.common.worker  # noqa: F401
    from cicada.common.launch import LaunchError, read_frame, write_frame

    preloaded = preload(preload_packages or [], trusted_packages)

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
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    os.chmod(socket_path, 0o600)  # only this user may ask for workers
    server.listen(16)
    server.settimeout(0.2)
    log.info("warm pool ready on %s (pid %d)", socket_path, os.getpid())
    try:
        while not stopping:
            try:
                conn, _ = server.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                conn.settimeout(5.0)
                try:
                    request = read_frame(conn)
                    reply = _answer(request, children, preloaded)
                except (LaunchError, OSError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                if reply.get("fork"):
                    pid = os.fork()
                    if pid == 0:
                        server.close()
                        code = 1
                        try:
                            code = _child(request["spec"])
                        finally:
                            os._exit(code)
                    children[pid] = None
                    reply = {"ok": True, "pid": pid}
                with contextlib.suppress(OSError):
                    write_frame(conn, reply)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        for pid, exit_code in children.items():
            if exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


def _answer(
    request: dict[str, Any], children: dict[int, int | None], preloaded: list[str]
) -> dict[str, Any]:
    from cicada.common.launch import WorkerSpec

    op = request.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid(), "preloaded": preloaded}
    if op == "status":
        pid = request.get("pid")
        if not isinstance(pid, int) or pid not in children:
            return {"ok": False, "error": f"no worker with pid {pid!r} from this pool"}
        return {"ok": True, "alive": children[pid] is None, "exit_code": children[pid]}
    if op == "launch":
        WorkerSpec.from_wire(request.get("spec"))  # validate before forking
        return {"fork": True}
    return {"ok": False, "error": f"unknown op {op!r}"}
