"""`cicada coordinator | edge | cloud | pool`: the long-running roles.

Each command imports its role only when it runs: `cicada edge` never imports torch, and
`cicada cloud` opens its package and starts reading weights before torch is imported.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from cicada.cli._common import (
    OptionError,
    PortTaken,
    batching_options,
    batching_settings,
    bind_problem,
    check_port_free,
    coordinator_option,
    curve_keys,
    curve_options,
    endpoint_callback,
    fail,
    listener_callback,
    setup_logging,
    trust_option,
)
from cicada.common.defaults import (
    DEFAULT_ADDRESS,
    DEFAULT_METRICS,
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    QUEUE_LIMIT,
    ROW_INVARIANCE,
)
from cicada.common.errors import CicadaError, PackageError


@click.command()
@click.option(
    "--bind",
    default=DEFAULT_ADDRESS,
    show_default=True,
    callback=endpoint_callback,
    help="ROUTER endpoint: tcp://HOST:PORT (HOST:PORT means the same), ipc://PATH. Without "
    "CURVE keys only loopback (or ipc://) is accepted, unless --insecure.",
)
@click.option(
    "--metrics",
    "metrics",
    default=DEFAULT_METRICS,
    show_default=True,
    callback=listener_callback,
    help="HOST:PORT for the Prometheus /metrics endpoint, the live page at / and its JSON at "
    "/status.json (docs/STATUS.md); a URL http://HOST:PORT/metrics means the same; 'off' to "
    "disable.",
)
@click.option(
    "--heartbeat",
    type=float,
    default=HEARTBEAT_INTERVAL_S,
    show_default=True,
    help=f"Heartbeat interval in seconds (a peer is dead after {LIVENESS} silent intervals).",
)
@click.option(
    "--queue-limit",
    type=int,
    default=QUEUE_LIMIT,
    show_default=True,
    help="Bound of each per-model, per-priority queue; beyond it requests are REJECTED.",
)
@click.option(
    "--curve-secret",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Coordinator's secret key file: turns CURVE encryption on.",
)
@click.option(
    "--allow",
    "--clients",
    "allow_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of client public keys (*.key): they may send requests and cancel "
    "them, nothing else (with --curve-secret).",
)
@click.option(
    "--worker-keys",
    "worker_keys",
    multiple=True,
    metavar="ROLE:MODEL[,MODEL...]:PATH",
    help="Public keys (a directory of *.key files, or one file) that may register as ROLE "
    "(edge or cloud) for those models only, e.g. edge:gpt2:/etc/cicada/curve-edge "
    "(repeatable; with --curve-secret).",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=False,
    help="Allow a non-loopback --bind without CURVE: anyone who reaches the port can "
    "then register as a worker and read requests. Only on a network you trust.",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file: coordinator settings and the cloud models it "
    "launches on demand and stops when idle (docs/deploy.md). Options given on the "
    "command line win over the file.",
)
@click.pass_context
def coordinator(
    ctx: click.Context,
    bind: str,
    metrics: str,
    heartbeat: float,
    queue_limit: int,
    curve_secret: Path | None,
    allow_dir: Path | None,
    worker_keys: tuple[str, ...],
    insecure: bool,
    log_level: str,
    config_path: Path | None,
) -> None:
    """Run the coordinator: route requests between clients, edge agents and cloud workers.

    With --config it also runs the serverless lifecycle: the first request for a configured
    model, whatever its priority, launches a cloud worker (a latency-critical request is
    still answered by the edge; the worker serves what comes next); idle workers drain and
    stop after their keep-alive.

    Watch it at http://METRICS/ (the live page: workers with residency and ETA, queues by
    priority, the last requests with who served them, latency over time), with `cicada
    status`, or by scraping http://METRICS/metrics.

    An endpoint that cannot be used, or a port already taken (--bind, --metrics), is one
    line on stderr and exit status 2 (as typed) or 1 (taken)."""
    setup_logging(log_level)
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig, WorkerKeys

    try:
        bound = [WorkerKeys.parse(value) for value in worker_keys]
    except CicadaError as exc:
        raise click.BadParameter(str(exc), param_hint="--worker-keys") from None
    file = None
    if config_path is not None:
        from cicada.edge.coordinator.config import load_config

        try:
            file = load_config(config_path)
        except CicadaError as exc:
            raise click.ClickException(str(exc)) from None

        def pick(name: str, value: Any, from_file: Any) -> Any:
            explicit = ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
            return value if explicit or from_file is None else from_file

        c = file.coordinator
        bind = pick("bind", bind, c.bind)
        metrics = pick("metrics", metrics, c.metrics)
        heartbeat = pick("heartbeat", heartbeat, c.heartbeat)
        queue_limit = pick("queue_limit", queue_limit, c.queue_limit)
        curve_secret = pick("curve_secret", curve_secret, c.curve_secret)
        allow_dir = pick("allow_dir", allow_dir, c.clients)
        insecure = insecure or c.insecure
        if not worker_keys:
            bound = [WorkerKeys.of(w.role, w.models, w.keys) for w in c.workers]
    metrics_bind = None
    if metrics != "off":
        host, _, port = metrics.rpartition(":")
        metrics_bind = (host, int(port))
        check_port_free("--metrics", host, int(port))
    if curve_secret is None and (allow_dir is not None or bound):
        raise click.UsageError("--allow and --worker-keys need --curve-secret (CURVE)")
    launched = None
    if curve_secret is not None and file is not None and file.models:
        launched = _launched_keys(file, curve_secret)
        # The launched workers' key may register as cloud for the models it is launched for.
        bound.append(WorkerKeys.of("cloud", list(file.models), launched[0]))
    if curve_secret is not None and allow_dir is None and not bound:
        raise click.UsageError(
            "--curve-secret needs keys to admit: --allow DIR (clients) and/or --worker-keys"
        )
    fair: dict[str, Any] = {}
    if file is not None:  # the bounds on what the coordinator holds: from the file only
        c = file.coordinator
        fair = dict(
            client_queue_limit=c.client_queue_limit,
            max_queued_bytes=c.max_queued_bytes,
            max_client_queued_bytes=c.max_client_queued_bytes,
            default_deadline_s=c.default_deadline_s,
            allow_critical=c.allow_critical,
            critical_clients=frozenset(c.critical_clients),
        )
    config = CoordinatorConfig(
        bind=bind,
        heartbeat_interval=heartbeat,
        queue_limit=queue_limit,
        metrics_bind=metrics_bind,
        curve_secret_file=curve_secret,
        curve_allow_dir=allow_dir,
        worker_keys=bound,
        insecure=insecure,
        **fair,
    )
    node = Coordinator(config)
    import zmq

    try:
        endpoint = node.bind()
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    except zmq.ZMQError as exc:
        node.close()
        port = bind.rpartition(":")[2]
        raise PortTaken("--bind", f"{bind}: {bind_problem(port, exc)}") from None
    except OSError as exc:  # the metrics port, taken since it was checked
        node.close()
        raise PortTaken("--metrics", f"{metrics}: {bind_problem(metrics, exc)}") from None
    if file is not None and file.models:
        try:
            node.lifecycle = _lifecycle(file, endpoint, heartbeat, launched)
        except CicadaError as exc:  # e.g. the warm pool or the Ray cluster is unreachable
            node.close()
            raise click.ClickException(str(exc)) from None
    import signal

    node.stop_event.on_signals(signal.SIGTERM)  # lock-free (common/signals.py)
    click.echo(
        f"coordinator on {endpoint}"
        + (
            f", metrics on http://{metrics}/metrics, live page on http://{metrics}/"
            if metrics_bind
            else ""
        ),
        err=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        node.serve_forever()


def _launched_keys(file: Any, curve_secret: Path) -> tuple[Path, Path]:
    """(the launched workers' key pair file, the coordinator's public key file) for a CURVE
    coordinator that launches its own cloud workers: without them none could register."""
    c = file.coordinator
    if c.worker_key is None:
        raise click.UsageError(
            "CURVE is on and the config launches cloud workers: set coordinator.worker_key "
            "(a key pair from `cicada keys`) so that they can register"
        )
    server = c.server_key
    if server is None:  # `cicada keys` writes NAME.key beside NAME.key_secret
        server = curve_secret.with_name(curve_secret.name.removesuffix("_secret"))
    for path, what in ((c.worker_key, "coordinator.worker_key"), (server, "server_key")):
        if not path.is_file():
            raise click.UsageError(f"{what}: {path} does not exist")
    return c.worker_key, server


def _lifecycle(
    file: Any, endpoint: str, heartbeat: float, keys: tuple[Path, Path] | None = None
) -> Any:
    """Wire the configured launcher into a Lifecycle (this CLI is the composition root: the
    coordinator itself only knows the Launcher interface). `keys`: the launched workers' CURVE
    key pair and the coordinator's public key, handed to every worker it launches."""
    import tempfile

    from cicada.common.launch import PoolLauncher, ProcessLauncher, WorkerSpec
    from cicada.edge.coordinator.lifecycle import Lifecycle

    c = file.coordinator
    log_dir = str(c.log_dir) if c.log_dir else None
    # Workers connect to where the coordinator listens; a wildcard bind is reached on loopback.
    address = endpoint.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")
    launcher: Any
    if c.launcher == "pool":
        socket_path = str(c.pool_socket or Path(tempfile.mkdtemp(prefix="cicada-pool-")) / "s")
        models = file.models.values()
        launcher = PoolLauncher(
            socket_path,
            log_dir=log_dir,
            preload=[str(cfg.package) for cfg in models if not cfg.trust_package_code],
            preload_trusted=[str(cfg.package) for cfg in models if cfg.trust_package_code],
        ).start()
    elif c.launcher == "ray":
        from cicada.cloud.ray_launcher import RayLauncher

        launcher = RayLauncher(
            address=c.ray_address,
            num_gpus=c.ray_num_gpus,
            resources=c.ray_resources or None,
            label_selector=c.ray_label_selector or None,
        ).start()
    else:
        launcher = ProcessLauncher()

    def spec_for(model: str, cfg: Any, name: str) -> WorkerSpec:
        return WorkerSpec(
            model=model,
            package=str(cfg.package),
            coordinator=address,
            name=name,
            device=cfg.device,
            threads=cfg.threads,
            row_invariant=cfg.row_invariant,
            heartbeat=heartbeat,
            curve_key=str(keys[0]) if keys else None,
            server_key=str(keys[1]) if keys else None,
            log_dir=log_dir,
            trust_package_code=cfg.trust_package_code,
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_ms=cfg.max_queue_delay_ms,
            preferred_batch_sizes=cfg.preferred_batch_sizes,
        )

    return Lifecycle(file.models, launcher, spec_for)


@click.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Unix socket to listen on for launch requests.",
)
@click.option(
    "--preload",
    "preload_packages",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A package whose model code to import ahead too (e.g. transformers and the model's "
    "class, ~2.5 s a worker would pay); repeatable. Its factory must be one of Cicada's own "
    "(docs/PACKAGE.md) unless --trust-package-code.",
)
@click.option(
    "--preload-trusted",
    "trusted_packages",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="As --preload, for a package whose code you trust (its factory may be any); repeatable.",
)
@click.option(
    "--trust-package-code",
    is_flag=True,
    help="Trust the code of every --preload package: import its factory even if it is not "
    "one of Cicada's own model builders (docs/PACKAGE.md, threat model).",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the forked workers' logs (NAME.log); a launch request naming another "
    "folder is refused. Without it the workers log nowhere.",
)
@click.option("--log-level", default="info", show_default=True)
def pool(
    socket_path: Path,
    preload_packages: tuple[Path, ...],
    trusted_packages: tuple[Path, ...],
    trust_package_code: bool,
    log_dir: Path | None,
    log_level: str,
) -> None:
    """Run a warm pool: import torch once, then fork a cloud worker per launch request.

    Started by `cicada coordinator` when its config says launcher = "pool" (it preloads the
    code of every configured model's package); the pool and its workers then die with the
    coordinator, even when it is killed. A forked worker trusts its package's code only if
    its launch request says so (the model's `trust_package_code`)."""
    _check_pool_socket(socket_path)
    from cicada.common.launch import die_with_launcher

    parent = die_with_launcher()
    setup_logging(log_level)
    from cicada.cloud.warm_pool import serve_pool

    trusted = [str(p) for p in trusted_packages]
    untrusted = [str(p) for p in preload_packages]
    if trust_package_code:
        trusted, untrusted = trusted + untrusted, []
    serve_pool(
        str(socket_path),
        untrusted,
        trusted,
        log_dir=str(log_dir) if log_dir else None,
        parent=parent,
    )


def _check_pool_socket(path: Path) -> None:
    """One line, not a traceback, for a --socket the pool cannot listen on: its folder is
    missing, or a live pool already answers there (which a new pool would silently steal)."""
    import socket

    if not path.parent.is_dir():
        raise OptionError("--socket", f"{path}: folder {path.parent} does not exist")
    if len(str(path).encode()) > 100:  # sun_path holds 104-108 bytes, the NUL included
        raise OptionError("--socket", f"{path}: too long for a Unix socket path (100 bytes)")
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket file: the pool replaces it
    raise PortTaken("--socket", f"{path}: a pool already listens there; stop it first")


@click.command()
@click.option("--model", "model_name", required=True, help="Model name clients invoke.")
@click.option(
    "--onnx",
    "model_dir",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Edge model directory from `cicada export-edge` (or a .onnx file).",
)
@coordinator_option
@click.option(
    "--capacity",
    type=int,
    default=2,
    show_default=True,
    help="Requests run at once (bounded concurrency).",
)
@click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="ONNX Runtime intra-op threads per request.",
)
@click.option(
    "--int8/--fp32",
    "int8",
    default=None,
    help="Which exported file to serve (default: int8 if it was exported).",
)
@click.option(
    "--token-interval",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Seconds at least between generated tokens: emulates a slower edge device "
    "(demos, benchmarks). 0: as fast as the model runs.",
)
@click.option(
    "--draft-interval",
    type=click.FloatRange(min=0.0),
    default=None,
    help="The same for the drafts sent after an exact takeover (default: --token-interval).",
)
@click.option("--name", default="", help="Worker name in replies and metrics.")
@click.option("--heartbeat", type=float, default=HEARTBEAT_INTERVAL_S, show_default=True)
@curve_options
@click.option("--log-level", default="info", show_default=True)
def edge(
    model_name: str,
    model_dir: Path,
    address: str,
    capacity: int,
    threads: int,
    int8: bool | None,
    token_interval: float,
    draft_interval: float | None,
    name: str,
    heartbeat: float,
    curve_key: Path | None,
    server_key: Path | None,
    log_level: str,
) -> None:
    """Run an edge agent: serve a small ONNX model through the coordinator (no torch)."""
    setup_logging(log_level)
    from cicada.edge.agent import EdgeAgent, EdgeAgentConfig

    try:
        agent = EdgeAgent(
            EdgeAgentConfig(
                model_dir=model_dir,
                model_name=model_name,
                coordinator=address,
                worker=name,
                capacity=capacity,
                threads=threads,
                int8=int8,
                heartbeat_interval=heartbeat,
                curve=curve_keys(curve_key, server_key),
                token_interval=token_interval,
                draft_interval=draft_interval,
            )
        )
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(agent.serve_forever())


@click.command()
@click.option("--model", "model_name", required=True, help="Model name clients invoke.")
@click.option(
    "--package",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model package from `cicada pack`.",
)
@coordinator_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads.")
@click.option(
    "--row-invariant",
    type=click.Choice(ROW_INVARIANCE),
    default="auto",
    show_default=True,
    help="CPU: run the one-token decode and draft verification on linears that give each "
    "row the same bits whatever the row count (exact verification, no replays): auto from "
    "2 threads on; always also on one thread (exact generations with edge drafts gain more "
    "than decoding alone loses); never.",
)
@click.option("--name", default="", help="Worker name in replies and metrics.")
@click.option("--heartbeat", type=float, default=HEARTBEAT_INTERVAL_S, show_default=True)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve GET /ready (200 once every stage is resident) and /healthz on this "
    "port, for orchestrators' probes (Knative, Kubernetes).",
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the health endpoint binds; in a pod probed by the kubelet, 0.0.0.0.",
)
@batching_options("the package's default, else ")
@trust_option
@curve_options
@click.option("--log-level", default="info", show_default=True)
def cloud(
    model_name: str,
    package: Path,
    address: str,
    device: str,
    threads: int | None,
    row_invariant: str,
    name: str,
    heartbeat: float,
    health_port: int | None,
    health_host: str,
    curve_key: Path | None,
    server_key: Path | None,
    max_batch_size: int | None,
    max_queue_delay_ms: float | None,
    preferred_batch_sizes: str | None,
    trust_package_code: bool,
    log_level: str,
) -> None:
    """Run a cloud worker: cold-start PACKAGE with the Cicada pipeline and serve it.

    It registers while still cold, reports residency as stages arrive, serves requests while
    loading (they start on resident stages) and drains cleanly on SIGTERM."""
    from cicada.common.launch import die_with_launcher

    die_with_launcher()  # launched by a coordinator: die with it
    setup_logging(log_level)
    keys = curve_keys(curve_key, server_key)
    if health_port is not None:
        check_port_free("--health-port", health_host, health_port)
    from cicada.cloud.batching import BatchConfigError
    from cicada.cloud.service import CloudWorker, CloudWorkerConfig

    batch = batching_settings(max_batch_size, max_queue_delay_ms, preferred_batch_sizes)
    try:
        worker = CloudWorker(
            CloudWorkerConfig(
                package=package,
                model_name=model_name,
                coordinator=address,
                worker=name,
                device=device,
                threads=threads,
                row_invariant=row_invariant,
                heartbeat_interval=heartbeat,
                curve=keys,
                health_port=health_port,
                health_host=health_host,
                trust_package_code=trust_package_code,
                batch=batch,
            )
        )
    except PackageError as exc:  # as every command that loads a package: exit status 2
        fail(exc)
        return
    except BatchConfigError as exc:  # options and the package's defaults do not combine
        raise click.BadParameter(str(exc), param_hint="--max-batch-size") from None
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(worker.serve_forever())
