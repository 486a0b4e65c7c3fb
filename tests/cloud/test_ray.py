"""Cloud workers as Ray actors, for real: a local Ray and a two-node Ray cluster on loopback.

Every worker here is a real `cicada.cloud.ray_launcher` actor running a CloudWorker for a tiny GPT-2
package, registering with a real `python -m cicada coordinator` process, and answering
requests sent through the SDK (`cicada.Client`).

* local ``ray.init``: launch, serve as role cloud, terminate -> drain -> gone from the
  coordinator and from Ray;
* a two-node ``ray.cluster_utils.Cluster`` (head: resource ``edge`` and label
  ``cicada-tier=edge``; second node: resource ``cloud`` and label ``cicada-tier=cloud``):
  placement by resource and by label, an unplaceable worker, every Ray port on loopback;
* the launcher's own local cluster (no ray_address): every port of every Ray process it
  starts on loopback, with Ray's default settings (a control shows they would not be);
* scale from zero and back, and a worker killed under load: the coordinator is a real
  ``cicada coordinator --config cfg.toml`` process with ``launcher = "ray"`` that joins the
  test's cluster as a second Ray driver (``ray_address``), exactly as in production; the test
  process, the first driver, watches the actors by name (namespace ``cicada``) and kills one.

Ray is kept on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` read when ray is imported,
and an explicit node address) and in a temporary directory (``HOME`` for its auth token,
``RAY_TMPDIR`` for its sessions and sockets), with no dashboard and a small object store.
Teardown shuts Ray and the cluster down, then waits for and kills (by pid) any process that
Ray started from this module and that survived. Waits are bounded polls for a condition,
never timing assertions.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from cicada.client import Client, InvokeResult
from cicada.common.launch import WorkerSpec
from cicada.errors import BadRequest, Failed, Rejected, Timeout, Unavailable
from cicada.testing import RecordingTransport, Stack

# Ray 2.60 reads this when it is imported: a single-host cluster binds 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip(
    "ray",
    reason="Ray is not installed (pip install 'ray[serve]==2.60.0', the [ray] extra)",
)

# Ray's own deprecation notices (pydantic v1-style fields inside ray.serve; Serve's
# metrics_interval_s, the only per-deployment way to make scale-to-zero quick in a test).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

MODEL = "gpt2"
NAMESPACE = "cicada"
HEARTBEAT = 0.2
LOOPBACK = "127.0.0.1"
WAIT = 300.0  # a bound on each wait on a busy machine (Ray starts slowly there), never a claim
OBJECT_STORE = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
EXPLICIT = (Timeout, Rejected, Unavailable, BadRequest, Failed)  # the SDK's explicit outcomes


# -- Ray on loopback, in a temporary directory -----------------------------------------------------


@pytest.fixture(scope="module")
def ray_home() -> Iterator[Path]:
    """A short temporary root (Ray's unix socket paths must stay under ~107 bytes) used as
    HOME and RAY_TMPDIR for this module's Ray processes and the coordinators it starts."""
    root = Path(tempfile.mkdtemp(prefix="cicada-ray-"))
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_TMPDIR")}
    os.environ["HOME"] = str(root)
    os.environ["RAY_TMPDIR"] = str(root)
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for _ in range(20):  # a Ray process may still be writing a last log line
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.25)


def _descendants() -> dict[int, psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    return {}


@contextlib.contextmanager
def _reaped(shutdown: Callable[[], None]) -> Iterator[None]:
    """Run `shutdown` after the body, then make sure every process started in between is
    gone: wait a little, then SIGKILL the survivors by pid."""
    before = set(_descendants())
    try:
        yield
    finally:
        started = [p for pid, p in _descendants().items() if pid not in before]
        try:
            shutdown()
        finally:
            _, alive = psutil.wait_procs(started, timeout=15)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)


def _shutdown_all(*steps: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            with contextlib.suppress(Exception):
                step()

    return run


@pytest.fixture
def local_ray(ray_home: Path) -> Iterator[None]:
    assert not ray.is_initialized(), "another test left Ray initialized"
    with _reaped(ray.shutdown):
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE,
            _node_ip_address=LOOPBACK,
            log_to_driver=False,
        )
        yield


@dataclass
class TwoNodes:
    address: str
    head_id: str
    cloud_id: str
    processes: list[psutil.Process]


@pytest.fixture(scope="module")
def cluster(ray_home: Path) -> Iterator[TwoNodes]:
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left Ray initialized"
    node = {"object_store_memory": OBJECT_STORE, "node_ip_address": LOOPBACK, "num_cpus": 1}
    holder: list[Any] = []
    with _reaped(_shutdown_all(ray.shutdown, lambda: holder and holder[0].shutdown())):
        c = Cluster(
            initialize_head=True,
            head_node_args={
                **node,
                "include_dashboard": False,
                "resources": {"edge": 1},
                "labels": {"cicada-tier": "edge"},
            },
        )
        holder.append(c)
        cloud = c.add_node(**node, resources={"cloud": 1}, labels={"cicada-tier": "cloud"})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield TwoNodes(
            address=c.address,
            head_id=c.head_node.node_id,
            cloud_id=cloud.node_id,
            processes=list(_descendants().values()),
        )


# -- model, coordinator, clients -------------------------------------------------------------------


# A GPT-2 whose forward takes tens of ms here (the tiny one: about one), so that a worker under
# load is caught mid-request when it is killed. Its token ids include the tiny model's (< 97),
# so the edge model of the tiny package still serves the same inputs.
SLOW_GPT2 = dict(n_layer=2, n_head=4, n_embd=256, vocab_size=50257, block_size=64)


@pytest.fixture(scope="module")
def assets(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> dict[str, Path]:
    from cicada.cloud.packing import pack

    work = tmp_path_factory.mktemp("ray-assets")
    paths = dict(tiny_package)
    paths["slow"] = work / "pkg-slow"
    pack("cicada.cloud.models.gpt2:build", paths["slow"], config=SLOW_GPT2)
    return paths


@pytest.fixture
def x(assets: dict[str, Path]) -> np.ndarray:
    return np.load(assets["input"])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    (tmp_path / "workers").mkdir()
    with Stack(tmp_path, heartbeat=HEARTBEAT) as s:  # kills every process it started
        yield s


def spec(stack: Stack, assets: dict[str, Path], name: str) -> WorkerSpec:
    return WorkerSpec(
        model=MODEL,
        package=str(assets["package"]),
        coordinator=stack.address,
        name=name,
        heartbeat=HEARTBEAT,
        log_dir=str(stack.work / "workers"),
    )


def logs(stack: Stack) -> str:
    """The coordinator's and the workers' logs, for assertion messages."""
    parts = [f"--- coordinator\n{stack.log('coordinator')}"]
    for path in sorted((stack.work / "workers").glob("*.log")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def named_actors() -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    )  # fmt: skip


def coordinator_config(stack: Stack, package: Path, address: str, **model: Any) -> Path:
    fields = {"keep_alive_s": 30.0, "max_workers": 1, "relaunch_backoff_s": 0.2, **model}
    lines = [
        "[coordinator]",
        'launcher = "ray"',
        f'ray_address = "{address}"',
        "ray_resources = { cloud = 1 }",
        'ray_label_selector = { "cicada-tier" = "cloud" }',
        f'log_dir = "{stack.work / "workers"}"',
        f"[models.{MODEL}]",
        f'package = "{package}"',
        *(f"{k} = {v!r}" for k, v in fields.items()),
    ]
    path = stack.work / "cicada.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the launcher module itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [(None, False), ("", False), ("false", False), ("0", False), ("true", True), ("YES", True),
     ("1", True), ("maybe", ValueError), ("on", ValueError)],
)  # fmt: skip
def test_serve_replicas_trust_package_code_only_when_told(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: Any
) -> None:
    """A Serve replica runs an outside factory only with CICADA_TRUST_PACKAGE_CODE=true (or
    bind(trust_package_code=True)); a value it cannot read is an error, never a silent no."""
    from cicada.cloud.ray_serve import _flag

    if env is None:
        monkeypatch.delenv("CICADA_TRUST_PACKAGE_CODE", raising=False)
    else:
        monkeypatch.setenv("CICADA_TRUST_PACKAGE_CODE", env)
    if expected is ValueError:
        with pytest.raises(ValueError, match="CICADA_TRUST_PACKAGE_CODE"):
            _flag(None, "CICADA_TRUST_PACKAGE_CODE")
    else:
        assert _flag(None, "CICADA_TRUST_PACKAGE_CODE") is expected
    assert _flag(True, "CICADA_TRUST_PACKAGE_CODE") is True  # bind() wins over the environment


def test_launcher_module_does_not_import_torch() -> None:
    """The coordinator imports the launcher; torch may only be imported inside the actor."""
    import subprocess
    import sys

    modules = ["cicada.cloud.ray_launcher"]
    with contextlib.suppress(ImportError):
        import ray.serve  # noqa: F401 - only with ray[serve]

        modules.append("cicada.cloud.ray_serve")
    code = f"import sys, {', '.join(modules)}; assert 'torch' not in sys.modules, 'torch!'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_coordinator_refuses_an_unreachable_ray_cluster(
    ray_home: Path, tmp_path: Path, assets: dict[str, Path]
) -> None:
    """A wrong ray_address is a clear error at start-up (ray.init alone retries for minutes)."""
    import subprocess
    import sys

    from cicada.testing import ROOT, free_port

    (tmp_path / "workers").mkdir()
    stack = Stack(tmp_path)
    config = coordinator_config(stack, assets["package"], f"{LOOPBACK}:{free_port()}")
    done = subprocess.run(
        [sys.executable, "-m", "cicada", "coordinator", "--config", str(config),
         "--bind", stack.address, "--metrics", "off"],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "cannot reach the Ray cluster" in done.stderr, done.stderr


# -- a local cluster the launcher starts itself: loopback only -----------------------------------

# Run in a fresh interpreter without this module's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, i.e. with
# Ray's defaults on Linux. First the control: the same start without the launcher's loopback
# switch, which must come up beyond loopback here (or the check below proves nothing) and be
# refused; then the launcher as shipped, with a task run so that a worker process listens too.
IMPLICIT_CLUSTER = """
import contextlib, json, os, sys, psutil, ray
from cicada.common.launch import LaunchError
from cicada.cloud import ray_launcher
from cicada.cloud.ray_launcher import RayLauncher

kwargs = {"num_cpus": 1, "object_store_memory": %d}
me = psutil.Process()
seen = {}
def note():
    for p in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            seen[p.pid] = p.create_time()

real = ray_launcher._loopback_node_address
ray_launcher._loopback_node_address = contextlib.nullcontext
try:
    RayLauncher(init_kwargs=kwargs).start()
    control = "started on " + ray.get_runtime_context().gcs_address
    note()
    ray.shutdown()
except LaunchError as exc:
    control = "refused: " + str(exc)
ray_launcher._loopback_node_address = real
assert not ray.is_initialized(), "a refused local cluster must be shut down"

launcher = RayLauncher(init_kwargs=kwargs).start()
pid = ray.get(ray.remote(lambda: os.getpid()).remote(), timeout=120)
note()
listening = []
for p in [me, *me.children(recursive=True)]:
    with contextlib.suppress(psutil.Error):
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                listening.append([p.pid, p.name(), c.laddr.ip, c.laddr.port])
launcher.close()
print(json.dumps({"control": control, "listening": listening, "task_pid": pid,
                  "started": seen, "left": ray.is_initialized()}))
"""


def test_launcher_refuses_to_move_its_local_cluster_off_loopback(ray_home: Path) -> None:
    from cicada.cloud.ray_launcher import RayLauncher
    from cicada.common.launch import LaunchError

    assert not ray.is_initialized(), "another test left Ray initialized"
    for kwargs in ({"_node_ip_address": "0.0.0.0"}, {"include_dashboard": True},
                   {"dashboard_host": "0.0.0.0"}):  # fmt: skip
        with pytest.raises(LaunchError, match="stays on loopback"):
            RayLauncher(init_kwargs=kwargs).start()
        assert not ray.is_initialized(), kwargs


@pytest.mark.slow  # starts a Ray cluster (~15 s): optional, `pytest -m slow`
def test_implicit_local_cluster_listens_on_loopback_only(ray_home: Path) -> None:
    """`launcher = "ray"` without ray_address: every listening socket of every process the
    launcher's Ray started (GCS, raylet, agents, the worker that ran a task, the driver) is on
    loopback, with Ray's defaults (cluster mode on, as on any Linux host)."""
    import json
    import subprocess
    import sys

    from cicada.testing import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                                             "RAY_ADDRESS")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", IMPLICIT_CLUSTER % OBJECT_STORE], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    report: dict[str, Any] = {}
    try:
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:  # Ray's processes outlive a failed script: end them, by pid and start time
        started = []
        for pid, created in report.get("started", {}).items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(int(pid))
                if p.create_time() == created:
                    started.append(p)
        _, alive = psutil.wait_procs(started, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    if report["control"].startswith("started on 127.0.0.1:"):
        pytest.skip("this host has no address beyond loopback: the check would prove nothing")
    control = report["control"]
    assert control.startswith("refused:") and "not loopback" in control, control
    listening = report["listening"]
    names = {name for _, name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"expected Ray's processes listening: {listening}"
    assert report["task_pid"] in {pid for pid, _, _, _ in listening}, "the worker listens too"
    outside = [entry for entry in listening if entry[2] not in (LOOPBACK, "::ffff:127.0.0.1")]
    assert not outside, f"the launcher's local Ray listens beyond loopback: {outside}"
    assert not report["left"], "close() leaves the Ray it started"


# -- (a) local ray.init ----------------------------------------------------------------------------


@pytest.mark.slow  # Ray launches a real worker: optional, `pytest -m slow`
def test_actor_worker_serves_through_the_sdk_and_drains(
    local_ray: None, stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    from cicada.cloud.ray_launcher import RayLauncher

    stack.coordinator()
    launcher = RayLauncher()
    try:
        handle = launcher.launch(spec(stack, assets, "gpt2-ray-a"))
        assert handle.alive()
        stack.wait_workers("cloud", 1, state="ready", timeout=WAIT)  # not loading
        with Client(stack.address, timeout=WAIT) as client:
            result = client.invoke(MODEL, x)
        assert result.served_by["role"] == "cloud", result.served_by
        assert result.served_by["worker"] == "gpt2-ray-a"
        assert result.output.shape[:2] == x.shape[:2] and np.isfinite(result.output).all()
        info = handle.info()
        assert info["registered"] and info["built"] and info["pid"] != os.getpid()

        handle.terminate()  # drain: finish, DISCONNECT, run() returns 0
        wait_until(lambda: not handle.alive(), "the worker to drain and stop", timeout=WAIT)
        assert handle.exit_code == 0 and handle.error is None, (handle.error, logs(stack))
        stack.wait_for(
            lambda s: stack.workers("cloud") == 0, what="the worker gone from the metrics"
        )
        wait_until(lambda: not actor_exists("gpt2-ray-a"), "the actor gone from Ray", WAIT)
        with Client(stack.address, timeout=10) as client, pytest.raises(Unavailable):
            client.invoke(MODEL, x)  # nobody serves the model any more, and nobody launches
    finally:
        launcher.close()
    assert ray.is_initialized(), "the launcher must not shut down a Ray it did not start"


# -- (b) two nodes: placement ----------------------------------------------------------------------


@pytest.mark.slow  # starts a Ray cluster (~15 s): optional, `pytest -m slow`
def test_every_ray_port_is_on_loopback(cluster: TwoNodes) -> None:
    listening = []
    for p in cluster.processes:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.append((p.name(), c.laddr.ip, c.laddr.port))
    assert listening, "found no Ray process listening at all"
    outside = [entry for entry in listening if entry[1] not in (LOOPBACK, "::ffff:127.0.0.1")]
    assert not outside, f"Ray listens beyond loopback: {outside}"


@pytest.mark.slow  # Ray launches a real worker: optional, `pytest -m slow`
def test_actor_is_placed_by_resource_and_by_label(
    cluster: TwoNodes, stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    from cicada.cloud.ray_launcher import RayLauncher

    stack.coordinator()
    by_resource = RayLauncher(resources={"cloud": 1})
    by_label = RayLauncher(label_selector={"cicada-tier": "edge"}, num_cpus=0)
    nowhere = RayLauncher(resources={"gpu-xl": 1})
    try:
        cloud = by_resource.launch(spec(stack, assets, "gpt2-on-cloud"))
        edge = by_label.launch(spec(stack, assets, "gpt2-on-edge"))
        stranded = nowhere.launch(spec(stack, assets, "gpt2-nowhere"))
        assert cloud.info(timeout=WAIT)["node_id"] == cluster.cloud_id
        assert edge.info(timeout=WAIT)["node_id"] == cluster.head_id
        stack.wait_workers("cloud", 2, state="ready", timeout=WAIT)
        with Client(stack.address, timeout=WAIT) as client:
            served = {client.invoke(MODEL, x).served_by["worker"] for _ in range(6)}
        assert served <= {"gpt2-on-cloud", "gpt2-on-edge"} and served, served
        # No node has the resource: the actor waits to be placed (alive, never registers)
        # until whoever launched it gives up, as the lifecycle does after start_timeout_s.
        assert stranded.alive()
        with pytest.raises(ray.exceptions.GetTimeoutError):
            stranded.info(timeout=1.0)
        stranded.kill()
        wait_until(lambda: not stranded.alive(), "the unplaceable actor to be killed", WAIT)
        assert stranded.exit_code is None and stranded.error
    finally:
        for launcher in (by_resource, by_label, nowhere):
            launcher.close()
    stack.wait_for(lambda s: stack.workers("cloud") == 0, what="both workers drained")
    assert not named_actors()


# -- (c) scale from zero and back ------------------------------------------------------------------


@pytest.mark.slow  # Ray launches a real worker: optional, `pytest -m slow`
def test_scale_from_zero_and_back(
    cluster: TwoNodes, stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    """The coordinator process launches an actor on the first request, drains it after the
    keep-alive (back to zero: gone from the coordinator and from Ray, its resource free),
    and launches a new one for the next request."""
    config = coordinator_config(stack, assets["package"], cluster.address, keep_alive_s=1.0)
    stack.coordinator("--config", str(config))
    assert stack.workers("cloud") == 0 and not named_actors()  # nothing runs before demand
    with Client(stack.address, timeout=WAIT) as client:
        first = client.invoke(MODEL, x)
        assert first.served_by["role"] == "cloud", first.served_by
        name = first.served_by["worker"]
        where = ray.get(ray.get_actor(name, namespace=NAMESPACE).ping.remote(), timeout=WAIT)
        assert where["node_id"] == cluster.cloud_id

        stack.wait_for(lambda s: stack.workers("cloud") == 0, what="scale to zero", timeout=WAIT)
        wait_until(lambda: not actor_exists(name), f"actor {name} gone from Ray", WAIT)
        wait_until(
            lambda: ray.available_resources().get("cloud") == 1.0, "the cloud resource freed", 30
        )

        second = client.invoke(MODEL, x)
        assert second.served_by["role"] == "cloud", second.served_by
        assert second.served_by["worker"] != name, "a new worker was launched from zero"
        np.testing.assert_allclose(second.output, first.output, rtol=1e-5, atol=1e-5)
    stack.kill("coordinator", signal.SIGTERM)  # closes the lifecycle: drain, then kill
    wait_until(lambda: not named_actors(), "no actor left behind the coordinator", WAIT)
    assert "idle for" in stack.log("coordinator"), logs(stack)


# -- (d) a worker killed under load ----------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    priority: int
    sent: float
    done: float = 0.0
    result: InvokeResult | None = None
    error: BaseException | None = None

    @property
    def request_id(self) -> str | None:
        if self.result is not None:
            return self.result.request_id
        return getattr(self.error, "request_id", None)


class Traffic:
    """One sync client per priority in `priorities`, each calling the model back to back
    until stopped (the tiny model computes in about a millisecond: without pauses the cloud
    worker is never idle for long); every outcome is recorded."""

    def __init__(
        self,
        address: str,
        x: np.ndarray,
        priorities: Sequence[int] = (1, 2, 1, 0),  # normal/quality prefer a ready cloud
        timeout: float = 20.0,
    ) -> None:
        self.address, self.x, self.timeout = address, x, timeout
        self.outcomes: list[Outcome] = []
        self.wire_ids: list[str] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._count = itertools.count()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(p,), name=f"ray-load-{n}", daemon=True)
            for n, p in enumerate(priorities)
        ]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"client threads still waiting on a call: {hung}"

    def _loop(self, priority: int) -> None:
        transport = RecordingTransport(self.address)
        with Client(self.address, timeout=self.timeout, transport=transport) as client:
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._count)
                    self.sent += 1
                o = Outcome(i, priority, time.monotonic())
                try:
                    o.result = client.invoke(MODEL, self.x, priority=priority)
                except Exception as exc:  # judged below: explicit, or a bug
                    o.error = exc
                o.done = time.monotonic()
                with self._lock:
                    self.outcomes.append(o)
            while transport.recv(0.3) is not None:  # late (duplicate?) replies still coming
                pass
        with self._lock:
            self.wire_ids += transport.reply_ids

    def served(self, role: str, worker: str | None = None, after: float = 0.0) -> int:
        with self._lock:
            return sum(
                1 for o in self.outcomes
                if o.result is not None and o.sent >= after
                and o.result.served_by.get("role") == role
                and (worker is None or o.result.served_by.get("worker") == worker)
            )  # fmt: skip

    def cloud_workers(self) -> set[str]:
        with self._lock:
            return {
                str(o.result.served_by.get("worker"))
                for o in self.outcomes
                if o.result is not None and o.result.served_by.get("role") == "cloud"
            }

    def summary(self) -> str:
        kinds = Counter(
            f"OK/{o.result.served_by.get('worker')}" if o.result else type(o.error).__name__
            for o in self.outcomes
        )
        return f"sent {self.sent}, outcomes {len(self.outcomes)}: {dict(kinds)}"


@pytest.mark.slow  # Ray launches a real worker: optional, `pytest -m slow`
def test_worker_killed_under_load_is_relaunched(
    cluster: TwoNodes, stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    """ray.kill the actor while requests are in flight: every request still ends exactly once,
    explicitly (an answer, from the edge or a new cloud worker, or an SDK error), and the
    coordinator's lifecycle sees the crash and launches a replacement."""
    config = coordinator_config(stack, assets["slow"], cluster.address)
    stack.coordinator("--config", str(config))
    stack.edge(MODEL, assets["edge"])
    stack.wait_workers("edge", 1, timeout=WAIT)
    with Traffic(stack.address, x) as traffic:
        wait_until(lambda: traffic.served("cloud") >= 5, "the first cloud worker serving", 120)
        (victim,) = traffic.cloud_workers()
        assert (
            ray.get(ray.get_actor(victim, namespace=NAMESPACE).ping.remote(), timeout=WAIT)[
                "node_id"
            ]
            == cluster.cloud_id
        )
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace=NAMESPACE), no_restart=True)
        wait_until(
            lambda: len(traffic.cloud_workers()) >= 2, "a relaunched worker serving", timeout=120
        )
        wait_until(lambda: traffic.served("edge", after=killed_at) >= 1, "edge answers", WAIT)
    summary = traffic.summary()
    outcomes = traffic.outcomes

    # Exactly one explicit outcome per request sent; no request answered twice.
    assert len(outcomes) == traffic.sent, summary
    assert sorted(o.index for o in outcomes) == list(range(traffic.sent)), summary
    ids = [o.request_id for o in outcomes]
    assert None not in ids, summary
    assert not [rid for rid, n in Counter(ids).items() if n > 1], summary
    assert not [rid for rid, n in Counter(traffic.wire_ids).items() if n > 1], summary
    # Cloud-bound requests were in flight when the worker died, and ended somewhere else.
    affected = [
        o for o in outcomes
        if o.sent < killed_at < o.done and o.priority >= 1
        and (o.result is None or o.result.served_by["worker"] != victim)
    ]  # fmt: skip
    assert affected, f"no cloud-bound request was in flight at the kill: {summary}"
    unexplained = [repr(o.error) for o in outcomes if o.result is None and not isinstance(
        o.error, EXPLICIT)]  # fmt: skip
    assert not unexplained, (unexplained, summary)
    # The coordinator answered every request (none lost), and the lifecycle relaunched.
    stack.wait_for(
        lambda s: sum(r["count"] for r in s["requests"]) >= traffic.sent,
        what="the coordinator to have answered every request",
        timeout=WAIT,
    )
    assert sum(r["count"] for r in stack.status()["requests"]) == traffic.sent, summary
    log = stack.log("coordinator")
    assert "exited unasked" in log, logs(stack)
    assert victim not in named_actors()
    stack.kill("coordinator", signal.SIGTERM)
    wait_until(lambda: not named_actors(), "no actor left behind the coordinator", WAIT)


# -- Ray Serve: the deployment behind cicada.cloud.ray_serve:app ---------------------------------


@pytest.mark.slow  # Ray launches a real worker: optional, `pytest -m slow`
def test_serve_deployment_scales_from_zero_and_back(
    cluster: TwoNodes, stack: Stack, assets: dict[str, Path], x: np.ndarray
) -> None:
    """min_replicas=0: nothing runs until a request reaches the deployment's route; the replica
    that starts registers with the coordinator and serves as role cloud; with no traffic Serve
    stops it again and it drains out of the coordinator."""
    import json
    import urllib.request

    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (ray[serve])")
    from cicada.cloud.ray_serve import deployment
    from cicada.testing import free_port

    stack.coordinator()
    port = free_port()
    app = deployment.options(
        autoscaling_config={
            "min_replicas": 0,
            "initial_replicas": 0,
            "max_replicas": 1,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 1,
            "downscale_to_zero_delay_s": 1,
            "look_back_period_s": 1,
            "metrics_interval_s": 0.5,
        },
        ray_actor_options={"num_cpus": 1, "resources": {"cloud": 1}},
        graceful_shutdown_timeout_s=30,
    ).bind(model=MODEL, package=str(assets["package"]), coordinator=stack.address,
           heartbeat=HEARTBEAT)  # fmt: skip
    try:
        # One proxy, on loopback: every node of this cluster shares the host's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
        serve.run(app, name="cicada-cloud", route_prefix="/cicada-cloud")
        assert stack.workers("cloud") == 0, "a replica before any demand"
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/cicada-cloud", timeout=120) as r:
            woken = json.loads(r.read())
        assert woken["registered"] and woken["node_id"] == cluster.cloud_id, woken
        with Client(stack.address, timeout=WAIT) as client:
            result = client.invoke(MODEL, x)
        assert result.served_by == {**result.served_by, "role": "cloud", "worker": woken["worker"]}
        stack.wait_for(
            lambda s: stack.workers("cloud") == 0, what="Serve to scale to zero", timeout=WAIT
        )
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
    assert "removed: draining" in stack.log("coordinator"), logs(stack)
