"""`RayLauncher`: cloud workers as Ray actors, placed by GPUs, custom resources or node labels.

The coordinator (a Ray driver) asks for a worker of a model; the launcher creates one actor per
worker, named after the worker, in the namespace ``cicada``::

    launcher = RayLauncher(address="10.0.0.5:6379", resources={"cloud": 1}, num_gpus=1).start()
    handle = launcher.launch(spec)       # returns at once: the actor is placed asynchronously
    handle.alive(); handle.terminate()   # drain: finish what runs, DISCONNECT, stop
    handle.kill()                        # ray.kill

The actor runs an ordinary `cicada.cloud.service.CloudWorker` for the spec: it registers with the
coordinator over the protocol while still cold, exactly like a process worker, so the
coordinator sees no difference. The actor is threaded (``max_concurrency``): ``run()`` holds
one thread for the worker's whole life (every forward runs on that thread, as CloudWorker
wants), ``stop()`` and ``ping()`` are answered on the others.

Liveness is the ``run()`` call itself: its result becomes ready when the worker returns (after
a drain) or the actor dies (``ray.kill``, a crash, its node lost), so ``alive()`` is a local,
non-blocking ``ray.wait(timeout=0)`` on an object the driver owns — no RPC per check, which
matters because the coordinator's loop asks on every tick. An actor that is still waiting for
a node with the resources it needs counts as alive; the lifecycle's ``start_timeout_s`` kills it
if it never registers. Once ``run()`` has returned, the handle kills the idle actor so that its
resources are released at once.

``max_restarts=0``: Ray never restarts a worker behind the coordinator's back; the lifecycle
notices the death and relaunches with backoff. Actors are not detached, so they share the
driver's fate: if the coordinator dies, Ray removes its workers.

Without an address (and without RAY_ADDRESS) the launcher starts a private local Ray cluster
and keeps every one of its processes on loopback: 127.0.0.1 as the node address, no dashboard
(Ray Jobs would run anyone's code). Ray rewrites a loopback node address to the host's own
address unless it considers cluster mode off (`ray_constants.ENABLE_RAY_CLUSTER`, read from
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported); the launcher turns that off for the
duration of ``ray.init`` only, then checks the node Ray registered is on loopback and refuses
(LaunchError, Ray shut down again) if it is not. A cluster that other machines join is started
by an operator (``ray start``) and named with `address`; ``address="auto"`` joins a running
local one.

This module imports ray but never torch: the coordinator lives on the edge side. torch is
imported inside the actor, by the CloudWorker. The package path in the spec must exist on
the node the actor lands on (shared storage or the image).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from cicada.common.launch import LaunchError, WorkerSpec

log = logging.getLogger("cicada.ray")

DEFAULT_NAMESPACE = "cicada"


class CloudWorkerActor:
    """The body of a worker actor (wrapped with `ray.remote` by the launcher)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = WorkerSpec.from_wire(spec)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: Any = None
        self._log_to(self.spec)

    @staticmethod
    def _log_to(spec: WorkerSpec) -> None:
        handler: logging.Handler
        if spec.log_dir:
            Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(spec.log_dir) / f"{spec.name}.log")
        else:
            handler = logging.StreamHandler(sys.stderr)  # Ray keeps it in the worker's log
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        cicada = logging.getLogger("cicada")
        cicada.addHandler(handler)
        cicada.setLevel(logging.INFO)

    def run(self) -> int:
        """Become the cloud worker: register, cold-start, serve until stopped. Blocks."""
        from cicada.cloud.service import CloudWorker, CloudWorkerConfig

        spec = self.spec
        worker = CloudWorker(CloudWorkerConfig.from_spec(spec))
        with self._lock:
            if self._stopping.is_set():
                return 0  # stopped before it ever registered
            self._worker = worker
        code = worker.serve_forever()
        log.info("%s stopped (exit code %d)", spec.name, code)
        return code

    def stop(self) -> bool:
        """Drain: take nothing new, finish what runs, DISCONNECT; `run()` then returns."""
        with self._lock:
            self._stopping.set()
            worker = self._worker
        if worker is not None:
            worker.runtime.drain()
        return worker is not None

    def ping(self) -> dict[str, Any]:
        """Where and what this worker is (cheap; for tests and operators)."""
        ctx = ray.get_runtime_context()
        worker = self._worker
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "registered": bool(worker is not None and worker.runtime.registered.is_set()),
            "built": bool(worker is not None and worker.built.is_set()),
            "stopping": self._stopping.is_set(),
        }


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a GCS address nobody listens on: ray.init would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return  # "auto", "local", or a form this check does not know: leave it to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise LaunchError(f"cannot reach the Ray cluster at {address}: {exc}") from None


# ray.init settings of the local cluster the launcher starts: loopback, no dashboard.
LOCAL_ONLY: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "include_dashboard": False,
                              "dashboard_host": "127.0.0.1"}  # fmt: skip


def _is_loopback(host: Any) -> bool:
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return str(host) == "localhost"


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep 127.0.0.1.

    In cluster mode (Linux's default) Ray replaces a loopback node address with the host's
    routable one (`ray._private.services.resolve_ip_for_localhost`), so GCS, raylet, the
    agents and every worker would listen beyond loopback. Ray's switch for that is a module
    constant read at import time; it is turned off here for the start of the local cluster
    only (the processes it spawns get the node address on their command line). Where Ray has
    no such constant, nothing is patched and `_start_local` checks the result instead."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


# run() holds one thread for the worker's life; stop() and ping() are answered on the others.
# No restarts and no retries: the coordinator's lifecycle relaunches, with backoff.
ACTOR_OPTIONS: dict[str, Any] = {"max_concurrency": 4, "max_restarts": 0, "max_task_retries": 0}
_remote_class: Any = None


def _actor_class() -> Any:
    global _remote_class
    if _remote_class is None:
        _remote_class = ray.remote(CloudWorkerActor)
    return _remote_class


@dataclass
class RayHandle:
    name: str
    actor: Any  # ray.actor.ActorHandle
    run_ref: Any  # ray.ObjectRef of actor.run(): ready when the worker returned or died
    namespace: str = DEFAULT_NAMESPACE
    _done: bool = False
    _exit_code: int | None = None
    _error: str | None = None

    def alive(self) -> bool:
        if self._done:
            return False
        if not ray.is_initialized():  # this driver left Ray: its actors went with it
            self._done, self._error = True, "this process is no longer connected to Ray"
            return False
        ready, _ = ray.wait([self.run_ref], timeout=0, fetch_local=False)
        if not ready:
            return True  # running, or still waiting for a node to place it on
        self._done = True
        try:
            self._exit_code = int(ray.get(self.run_ref, timeout=1.0))
        except Exception as exc:  # killed, crashed, node lost, or CloudWorker raised
            self._error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._release()
        return False

    @property
    def exit_code(self) -> int | None:
        """The worker's exit code once `run()` returned; None while alive or if it died."""
        return self._exit_code

    @property
    def error(self) -> str | None:
        """Why the actor ended without an exit code (killed, crashed), once known."""
        return self._error

    def terminate(self) -> None:
        if not self._done:
            with contextlib.suppress(Exception):  # a dead actor: nothing to drain
                self.actor.stop.remote()

    def kill(self) -> None:
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.actor, no_restart=True)

    def info(self, timeout: float = 10.0) -> dict[str, Any]:
        """The actor's `ping()`: node id, pid, registered/built. Blocks up to `timeout`."""
        return dict(ray.get(self.actor.ping.remote(), timeout=timeout))


@dataclass
class RayLauncher:
    """Launches each cloud worker as a Ray actor.

    `address`: the Ray cluster to join (None: RAY_ADDRESS if set, else start a private local
    cluster on loopback, see the module doc; "auto": a running local cluster). Ignored when this
    process is already connected to Ray. `init_kwargs` go to ``ray.init`` (for a local cluster,
    e.g. ``num_cpus``); they cannot move a local cluster off loopback.
    Placement: `num_gpus`, `num_cpus` and custom `resources` (e.g. ``{"cloud": 1}``) reserve
    capacity on the chosen node; `label_selector` (e.g. ``{"cicada-tier": "cloud"}``) picks
    nodes by label where the installed Ray supports it (2.49+).
    """

    address: str | None = None
    resources: dict[str, float] | None = None
    num_gpus: float = 0
    num_cpus: float = 1
    label_selector: dict[str, str] | None = None
    namespace: str = DEFAULT_NAMESPACE
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    close_grace_s: float = 5.0
    kind: str = "ray"
    handles: list[RayHandle] = field(default_factory=list)
    _owns_ray: bool = False

    def start(self) -> RayLauncher:
        """Connect to Ray (unless this process already is). Call before serving: joining a
        cluster takes a second or more, starting a local one ten times that."""
        if ray.is_initialized():
            return self
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            self._start_local()
        else:
            _check_reachable(address)
            self._init(address=address)
        self._owns_ray = True
        log.info("connected to Ray: %s", ray.get_runtime_context().gcs_address)
        return self

    def _init(self, **kwargs: Any) -> None:
        kwargs = {
            "namespace": self.namespace,
            "log_to_driver": False,  # the workers' logs stay in Ray's (or spec.log_dir)
            **kwargs,
            **self.init_kwargs,
        }
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = kwargs.get("address") or "the local Ray cluster"
            raise LaunchError(f"cannot connect to Ray at {where}: {exc}") from None

    def _start_local(self) -> None:
        """A private Ray cluster whose every process listens on loopback only."""
        for key, value in self.init_kwargs.items():
            if key in LOCAL_ONLY and value != LOCAL_ONLY[key] and not _is_loopback(value):
                raise LaunchError(
                    f"a local Ray cluster started by the launcher stays on loopback "
                    f"({key}={value!r} refused): start a cluster others can reach with "
                    f"`ray start` and give its address (ray_address)"
                )
        with _loopback_node_address():
            self._init(address="local", **LOCAL_ONLY)
        nodes = {str(n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")}
        gcs_host = ray.get_runtime_context().gcs_address.rpartition(":")[0]
        if not all(_is_loopback(host) for host in {gcs_host, *nodes}):
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise LaunchError(
                f"the local Ray cluster came up on {sorted({gcs_host, *nodes})}, not loopback "
                f"(this Ray version ignores the loopback node address): refusing to run it; "
                f"start one with `ray start --node-ip-address=127.0.0.1` and set ray_address"
            )

    def options(self, spec: WorkerSpec) -> dict[str, Any]:
        opts: dict[str, Any] = {
            **ACTOR_OPTIONS,
            "name": spec.name,
            "namespace": self.namespace,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.label_selector:
            opts["label_selector"] = dict(self.label_selector)
        return opts

    def launch(self, spec: WorkerSpec) -> RayHandle:
        self.start()
        if spec.device.startswith("cuda") and not self.num_gpus:
            log.warning("%s wants %s but its actor reserves no GPU (num_gpus=0)", spec.name,
                        spec.device)  # fmt: skip
        try:
            actor = _actor_class().options(**self.options(spec)).remote(spec.to_wire())
            run_ref = actor.run.remote()
        except (ValueError, TypeError) as exc:  # e.g. the name is taken, a bad option
            raise LaunchError(f"cannot create a Ray actor for {spec.name}: {exc}") from None
        handle = RayHandle(spec.name, actor, run_ref, self.namespace)
        self.handles.append(handle)
        self.handles = [h for h in self.handles if not h._done]
        return handle

    def close(self) -> None:
        """Drain what still runs (up to `close_grace_s`), kill the rest, leave Ray."""
        if not ray.is_initialized():
            self.handles.clear()
            return
        live = [h for h in self.handles if h.alive()]
        for h in live:
            h.terminate()
        if live and self.close_grace_s > 0:
            deadline = time.monotonic() + self.close_grace_s
            while time.monotonic() < deadline and any(h.alive() for h in live):
                time.sleep(0.05)
        for h in live:
            h.kill()
        self.handles.clear()
        if self._owns_ray:
            self._owns_ray = False
            with contextlib.suppress(Exception):
                ray.shutdown()
