"""The cloud worker as a Ray Serve deployment: ``serve run cicada.cloud.ray_serve:app``.

Each replica runs an ordinary `cicada.cloud.service.CloudWorker`: it registers with the coordinator
over the protocol while still cold, loads, serves the requests the coordinator routes to it,
and drains (finishes what it accepted, DISCONNECT) when Serve stops the replica. Inference
traffic never passes through Serve; Serve only decides how many replicas exist:
``min_replicas=0`` with ``initial_replicas=0`` means nothing runs until Serve sees traffic on
the deployment's route. An HTTP request to the route (``GET /cicada-cloud`` in
deploy/ray/rayservice.yaml) is the wake-up call: it starts a replica if there is none and
answers with the worker's state once it has registered. An idle replica goes after the
deployment's ``downscale_delay_s`` (the keep-alive). For scale-from-zero driven by the
coordinator itself, use `cicada.cloud.ray_launcher.RayLauncher` (``launcher = "ray"``).

Configuration comes from the environment of the replica (runtime_env ``env_vars``) unless
given to ``deployment.bind(...)``:

    CICADA_MODEL, CICADA_PACKAGE, CICADA_COORDINATOR   (required)
    CICADA_DEVICE (cpu), CICADA_THREADS, CICADA_HEARTBEAT (0.5),
    CICADA_TRUST_PACKAGE_CODE (false: a factory outside Cicada's allow-list is refused;
                               true/1/yes runs it, see docs/PACKAGE.md's threat model)
    CICADA_CURVE_KEY + CICADA_SERVER_KEY               (CURVE: this worker's secret key file
                                                        and the coordinator's public key file)

Like the launcher, this module never imports torch; the replica's worker thread does.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from cicada.common.defaults import HEARTBEAT_INTERVAL_S

log = logging.getLogger("cicada.serve")

WAKE_TIMEOUT_S = 60.0  # how long a wake-up request waits for the worker to register
DRAIN_TIMEOUT_S = 110.0  # below deploy/ray/rayservice.yaml's graceful_shutdown_timeout_s


def _setting(value: Any, env: str, default: Any = None, required: bool = False) -> Any:
    if value is not None:
        return value
    found = os.environ.get(env)
    if found is None or found == "":
        if required:
            raise ValueError(f"set {env} in the deployment's runtime_env (or pass it to bind())")
        return default
    return found


def _flag(value: bool | None, env: str) -> bool:
    """A boolean setting: `value` if given, else the environment's true/1/yes or
    false/0/no/unset; anything else is a configuration error, not a silent False."""
    if value is not None:
        return value
    found = os.environ.get(env, "").strip().lower()
    if found in ("", "0", "false", "no"):
        return False
    if found in ("1", "true", "yes"):
        return True
    raise ValueError(f"{env}={found!r}: use true or false")


class CloudWorkerReplica:
    """One replica: a cloud worker registered with the coordinator (see the module doc)."""

    def __init__(
        self,
        model: str | None = None,
        package: str | None = None,
        coordinator: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        heartbeat: float | None = None,
        name: str | None = None,
        trust_package_code: bool | None = None,
    ) -> None:
        from cicada.cloud.service import CloudWorker, CloudWorkerConfig
        from cicada.common.sockets import CurveKeys

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("cicada").addHandler(handler)
        logging.getLogger("cicada").setLevel(logging.INFO)

        model = _setting(model, "CICADA_MODEL", required=True)
        curve_key = os.environ.get("CICADA_CURVE_KEY")
        server_key = os.environ.get("CICADA_SERVER_KEY")
        threads_s = _setting(threads, "CICADA_THREADS")
        trusted = _flag(trust_package_code, "CICADA_TRUST_PACKAGE_CODE")
        if name is None:
            replica = serve.get_replica_context().replica_id.unique_id
            name = f"{model}-serve-{replica}"
        self.name = name
        self.worker = CloudWorker(
            CloudWorkerConfig(
                package=Path(_setting(package, "CICADA_PACKAGE", required=True)),
                model_name=model,
                coordinator=_setting(coordinator, "CICADA_COORDINATOR", required=True),
                worker=name,
                device=_setting(device, "CICADA_DEVICE", "cpu"),
                trust_package_code=trusted,
                threads=int(threads_s) if threads_s else None,
                heartbeat_interval=float(
                    _setting(heartbeat, "CICADA_HEARTBEAT", HEARTBEAT_INTERVAL_S)
                ),
                curve=CurveKeys.load(Path(curve_key), Path(server_key))
                if curve_key and server_key
                else None,
            )
        )
        self.exit_code: int | None = None
        # serve_forever runs every forward on the thread that calls it: one thread for life.
        self._thread = threading.Thread(target=self._serve, name="cicada-worker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.exit_code = self.worker.serve_forever()
        except BaseException:
            self.exit_code = -1
            log.exception("%s: the cloud worker failed", self.name)
            raise

    def status(self) -> dict[str, Any]:
        s = self.worker.status()
        import ray

        return {
            "worker": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "registered": self.worker.runtime.registered.is_set(),
            "state": str(s.state),
            "resident_stages": s.resident_stages,
            "total_stages": s.total_stages,
            "exit_code": self.exit_code,
        }

    async def __call__(self, request: Any = None) -> dict[str, Any]:
        """The wake-up call: wait (bounded) until this replica's worker has registered."""
        import asyncio

        deadline = time.monotonic() + WAKE_TIMEOUT_S
        while not self.worker.runtime.registered.is_set() and time.monotonic() < deadline:
            if not self._thread.is_alive():
                break
            await asyncio.sleep(0.05)
        return self.status()

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"{self.name}: the cloud worker exited ({self.exit_code})")

    def __del__(self) -> None:
        """Serve stops the replica: drain (finish what was accepted, DISCONNECT)."""
        worker = getattr(self, "worker", None)
        thread = getattr(self, "_thread", None)
        if worker is None or thread is None:
            return
        worker.runtime.drain()
        thread.join(DRAIN_TIMEOUT_S)


deployment = serve.deployment(
    name="CloudWorker",
    max_ongoing_requests=8,
    graceful_shutdown_timeout_s=120,
    autoscaling_config={
        "min_replicas": 0,
        "initial_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 60,
    },
    ray_actor_options={"num_cpus": 1},
)(CloudWorkerReplica)
app = deployment.bind()
