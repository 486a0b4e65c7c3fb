"""Starting cloud workers: one small interface, several launchers.

The coordinator asks a `Launcher` for a worker of a model and gets a `WorkerHandle` back; the
worker then registers over the protocol like any other. Launchers:

* `ProcessLauncher` (the embedded default): `python -m cicada cloud ...` as a child process:
  a true cold start (process, torch import, weights).
* `PoolLauncher`: asks a warm pool (`cicada pool`, cloud/warm_pool.py: a process that has
  already imported torch and the pipeline) to fork a worker: the import is paid in advance.
* `cicada.cloud.ray_launcher.RayLauncher` (extra `[ray]`): the worker as a Ray actor placed by
  GPU or custom resources.

This module is torch-free: the coordinator lives on the edge side and only ever sees specs,
handles and processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack

from cicada.common.defaults import BATCHING_SETTINGS, HEARTBEAT_INTERVAL_S, ROW_INVARIANCE
from cicada.common.errors import LaunchError, PackageFormatError
from cicada.common.package import parse_batching


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a cloud worker needs to start, whoever starts it."""

    model: str
    package: str
    coordinator: str
    name: str
    device: str = "cpu"
    threads: int | None = None
    row_invariant: str = "auto"  # common.defaults.ROW_INVARIANCE
    heartbeat: float = HEARTBEAT_INTERVAL_S
    curve_key: str | None = None
    server_key: str | None = None
    log_dir: str | None = None
    # The coordinator's `trust_package_code` for this model: run its factory even if it is
    # outside the allow-list (docs/PACKAGE.md, "Threat model").
    trust_package_code: bool = False
    # Dynamic batching (Triton's settings; cloud/batching.py); None: the package's default
    # (its manifest's `batching`), else one dispatch at a time.
    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    preferred_batch_sizes: list[int] | None = None

    def batching(self) -> dict[str, Any]:
        """The batching settings this spec sets (the others are left to the package)."""
        return {k: v for k in BATCHING_SETTINGS if (v := getattr(self, k)) is not None}

    def cli_args(self) -> list[str]:
        args = [
            "cloud",
            "--model",
            self.model,
            "--package",
            self.package,
            "--coordinator",
            self.coordinator,
            "--name",
            self.name,
            "--device",
            self.device,
            "--heartbeat",
            str(self.heartbeat),
        ]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.row_invariant != "auto":
            args += ["--row-invariant", self.row_invariant]
        if self.curve_key and self.server_key:
            args += ["--curve-key", self.curve_key, "--server-key", self.server_key]
        if self.trust_package_code:
            args.append("--trust-package-code")
        if self.max_batch_size is not None:
            args += ["--max-batch-size", str(self.max_batch_size)]
        if self.max_queue_delay_ms is not None:
            args += ["--max-queue-delay-ms", repr(float(self.max_queue_delay_ms))]
        if self.preferred_batch_sizes is not None:
            args += ["--preferred-batch-sizes", ",".join(map(str, self.preferred_batch_sizes))]
        return args

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, doc: Any) -> WorkerSpec:
        if not isinstance(doc, dict):
            raise LaunchError("worker spec must be a map")
        try:
            spec = cls(**doc)
        except TypeError as exc:
            raise LaunchError(f"bad worker spec: {exc}") from None
        return check_spec(spec)


# -- what a spec from the wire may hold ------------------------------------------------------------

# A worker's name becomes a file name (its log) and a label: letters, digits, '.', '_', '-',
# starting with a letter or digit, never '..': no path separator can reach a file system call.
WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEVICE = re.compile(r"[a-z]{2,16}(:[0-9]{1,4})?")  # cpu, cuda, cuda:1, mps, ...
MAX_SPEC_STRING = 4096
MAX_HEARTBEAT_S = 3600.0
MAX_THREADS = 4096


def check_worker_name(name: object) -> str:
    if not isinstance(name, str) or not WORKER_NAME.fullmatch(name) or ".." in name:
        raise LaunchError(
            f"bad worker spec: name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def _has_type(value: object, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (str, bool, list):
        return isinstance(value, kind)
    return True  # a type this check does not know: left to the field's own consumer


def check_spec(spec: WorkerSpec) -> WorkerSpec:
    """Refuse a spec whose fields have the wrong types or values out of range (a launch
    request on the warm pool's socket, a Ray actor's argument): nothing is forked, nothing
    written, for a nonsense spec. Returns the spec."""
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        hint = hints[f.name]
        kinds = (list,) if typing.get_origin(hint) is list else typing.get_args(hint) or (hint,)
        if not any(_has_type(value, k) for k in kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise LaunchError(
                f"bad worker spec: {f.name} must be {wanted}, not {type(value).__name__}"
            )
        if isinstance(value, str) and (len(value) > MAX_SPEC_STRING or "\x00" in value):
            raise LaunchError(f"bad worker spec: {f.name} is too long or holds a NUL")
    for required in ("model", "package", "coordinator"):
        if not getattr(spec, required):
            raise LaunchError(f"bad worker spec: {required} is empty")
    check_worker_name(spec.name)
    if not DEVICE.fullmatch(spec.device):
        raise LaunchError(f"bad worker spec: device {spec.device!r} (cpu, cuda, cuda:N, ...)")
    if not (math.isfinite(spec.heartbeat) and 0 < spec.heartbeat <= MAX_HEARTBEAT_S):
        raise LaunchError(f"bad worker spec: heartbeat {spec.heartbeat!r} is not in (0, 3600]")
    if spec.threads is not None and not 1 <= spec.threads <= MAX_THREADS:
        raise LaunchError(f"bad worker spec: threads {spec.threads!r} is not in [1, 4096]")
    if spec.row_invariant not in ROW_INVARIANCE:
        raise LaunchError(
            f"bad worker spec: row_invariant {spec.row_invariant!r} is not one of "
            + ", ".join(ROW_INVARIANCE)
        )
    try:  # the same bounds as a package's defaults
        parse_batching(spec.batching(), "bad worker spec: batching")
    except PackageFormatError as exc:
        raise LaunchError(str(exc)) from None
    return spec


def worker_log_path(log_dir: str | Path, name: str) -> Path:
    """`<log_dir>/<name>.log`, for a name that cannot leave `log_dir`."""
    return Path(log_dir) / f"{check_worker_name(name)}.log"


def open_log(path: Path) -> int:
    """Open a log for appending, as a new file or an existing regular one: never through a
    symbolic link planted at its name. Returns the descriptor."""
    return os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )


# -- dying with the launcher ----------------------------------------------------------------------

# A launcher that starts a process (the warm pool, a cold worker) puts its own pid here; the
# process arms the parent-death signal against it (die_with_launcher).
PARENT_PID_ENV = "CICADA_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> bool:
    """Linux: ask the kernel to send `sig` to this process when its parent exits, however it
    exits (SIGKILL included): prctl(PR_SET_PDEATHSIG) through ctypes. Then make sure the parent
    is still `parent`: had it died before the call, the signal would never come, so it is
    sent now. The setting is per process, cleared in a fork's child (which arms its own), and
    follows the parent *thread* that started the process. Returns False where it is not
    available (not Linux): the caller polls os.getppid() instead, or nothing guards it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def die_with_launcher() -> int | None:
    """In a process a launcher started: arm the parent-death signal against the launcher's pid
    (PARENT_PID_ENV), and take the variable out of the environment so that this process's own
    children do not inherit it. Returns that pid, or None when nobody launched this process
    (started by hand, by systemd, by Knative)."""
    value = os.environ.pop(PARENT_PID_ENV, "")
    if not value.isdigit():
        return None
    die_with_parent(int(value))
    return int(value)


def launched_env() -> dict[str, str]:
    """The environment for a process this one launches and that must die with it."""
    return dict(os.environ, **{PARENT_PID_ENV: str(os.getpid())})


class WorkerHandle(Protocol):
    name: str

    def alive(self) -> bool: ...

    def terminate(self) -> None:
        """Ask the worker to drain and stop (SIGTERM or the launcher's equivalent)."""

    def kill(self) -> None: ...


class Launcher(Protocol):
    kind: str

    def launch(self, spec: WorkerSpec) -> WorkerHandle: ...

    def close(self) -> None: ...


# -- local processes -----------------------------------------------------------------------------


@dataclass
class ProcessHandle:
    name: str
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@dataclass
class ProcessLauncher:
    """Cold processes, the embedded default."""

    kind: str = "process"
    handles: list[ProcessHandle] = field(default_factory=list)

    def launch(self, spec: WorkerSpec) -> ProcessHandle:
        log = _log_file(spec)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cicada", *spec.cli_args()],
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=launched_env(),  # the worker dies with the coordinator, even on SIGKILL
            )
        except OSError as exc:
            raise LaunchError(f"cannot start a worker for {spec.model}: {exc}") from None
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        handle = ProcessHandle(spec.name, proc)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        for h in self.handles:
            if h.alive():
                h.kill()
        self.handles.clear()


def _log_file(spec: WorkerSpec) -> Any:
    if not spec.log_dir:
        return subprocess.DEVNULL
    path = worker_log_path(spec.log_dir, spec.name)
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
    try:
        return os.fdopen(open_log(path), "ab")
    except OSError as exc:
        raise LaunchError(f"cannot open the log {path}: {exc}") from None


# -- warm pool -----------------------------------------------------------------------------------

# The pool speaks length-prefixed msgpack maps over a unix socket (never pickle):
#   {"op": "launch", "spec": {...}}  -> {"ok": true, "pid": 123} | {"ok": false, "error": "..."}
#   {"op": "status", "pid": 123}     -> {"ok": true, "alive": bool, "exit_code": int | nil}
#   {"op": "ping"}                   -> {"ok": true, "pid": <pool pid>}
MAX_POOL_MESSAGE = 64 * 1024


def pool_call(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            write_frame(s, request)
            reply = read_frame(s)
        except OSError as exc:
            raise LaunchError(f"warm pool at {path} did not answer: {exc}") from None
    if not reply.get("ok"):
        raise LaunchError(f"warm pool refused: {reply.get('error', 'unknown error')}")
    return reply


def write_frame(s: socket.socket, doc: dict[str, Any]) -> None:
    body = msgpack.packb(doc, use_bin_type=True)
    s.sendall(struct.pack("<I", len(body)) + body)


def read_frame(s: socket.socket) -> dict[str, Any]:
    return unpack_frame(_recv_exact(s, frame_size(_recv_exact(s, 4))))


def frame_size(head: bytes) -> int:
    """The body's size from a frame's 4-byte head, refused beyond MAX_POOL_MESSAGE."""
    (size,) = struct.unpack("<I", head)
    if size > MAX_POOL_MESSAGE:
        raise LaunchError(f"pool message of {size} bytes exceeds {MAX_POOL_MESSAGE}")
    return int(size)


def unpack_frame(body: bytes) -> dict[str, Any]:
    try:
        doc = msgpack.unpackb(
            body,
            raw=False,
            max_str_len=MAX_POOL_MESSAGE,
            max_array_len=256,
            max_map_len=256,
        )
    except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
        raise LaunchError(f"pool message is not msgpack: {exc}") from None
    if not isinstance(doc, dict):
        raise LaunchError("pool message is not a map")
    return doc


def _recv_exact(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise LaunchError("pool connection closed mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass
class PoolHandle:
    name: str
    pid: int
    socket_path: str

    def alive(self) -> bool:
        try:
            return bool(pool_call(self.socket_path, {"op": "status", "pid": self.pid})["alive"])
        except LaunchError:
            return False  # the pool died, and its children with it

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


@dataclass
class PoolLauncher:
    """Forks workers from a warm pool process (`cicada pool`), starting the pool if asked."""

    socket_path: str
    start_pool: bool = True
    log_dir: str | None = None
    preload: list[str] = field(default_factory=list)  # packages whose model code to import
    # Packages whose model code the pool imports even outside the allow-list (their model's
    # `trust_package_code`); the others' factories must be allow-listed to be preloaded.
    preload_trusted: list[str] = field(default_factory=list)
    kind: str = "pool"
    _pool: subprocess.Popen[bytes] | None = None
    handles: list[PoolHandle] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> PoolLauncher:
        if self.start_pool:
            if self.log_dir:
                Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            log = (
                open(Path(self.log_dir) / "pool.log", "ab")  # noqa: SIM115
                if self.log_dir
                else subprocess.DEVNULL
            )
            preload = [arg for package in self.preload for arg in ("--preload", package)]
            preload += [arg for p in self.preload_trusted for arg in ("--preload-trusted", p)]
            logs = ["--log-dir", self.log_dir] if self.log_dir else []
            self._pool = subprocess.Popen(
                [sys.executable, "-m", "cicada", "pool", "--socket", self.socket_path,
                 *preload, *logs],
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=launched_env(),  # the pool (and its workers) die with this process
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                pool_call(self.socket_path, {"op": "ping"}, timeout=1.0)
                return self
            except LaunchError:
                if self._pool is not None and self._pool.poll() is not None:
                    raise LaunchError("the warm pool exited while starting") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def launch(self, spec: WorkerSpec) -> PoolHandle:
        reply = pool_call(self.socket_path, {"op": "launch", "spec": spec.to_wire()})
        handle = PoolHandle(spec.name, int(reply["pid"]), self.socket_path)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        for h in self.handles:
            h.kill()
        self.handles.clear()
        if self._pool is not None and self._pool.poll() is None:
            self._pool.send_signal(signal.SIGTERM)
            try:
                self._pool.wait(10)
            except subprocess.TimeoutExpired:
                self._pool.kill()
                self._pool.wait()
