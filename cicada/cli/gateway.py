"""`cicada gateway`: the HTTP front door (OpenAI API, KServe v2) of a coordinator; a separate
process, so several can run beside one coordinator (docs/GATEWAY.md). Torch-free."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from pathlib import Path

import click

from cicada.cli._common import curve_keys, curve_options, setup_logging
from cicada.common.defaults import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S
from cicada.gateway.defaults import DEFAULT_LISTEN, DEFAULT_MAX_BODY_BYTES


def _package(value: str) -> tuple[str, Path]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise click.BadParameter(f"{value!r} is not NAME=DIR", param_hint="--package")
    return name, Path(directory)


def _listen(value: str, insecure: bool) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--listen")
    if not insecure:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise click.BadParameter(
                f"{host} is not a loopback address: the gateway has no authentication or TLS; "
                "put it behind a proxy that has them and pass --insecure",
                param_hint="--listen",
            )
    return host, int(port)


def _metrics_url(value: str | None) -> str | None:
    """The coordinator's metrics: HOST:PORT (as `cicada coordinator --metrics`) or a URL."""
    if value is None or "://" in value:
        return value
    return f"http://{value}/metrics"


@click.command()
@click.option(
    "--coordinator",
    default=DEFAULT_ADDRESS,
    show_default=True,
    envvar="CICADA_ADDRESS",
    show_envvar=True,
    help="The coordinator's endpoint.",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to serve HTTP on (loopback only, unless --insecure).",
)
@click.option(
    "--package",
    "packages",
    multiple=True,
    metavar="NAME=DIR",
    help="A model's package or edge model directory: its tensor signature, context and "
    "tokenizer.json (text prompts) for model NAME (repeatable).",
)
@click.option(
    "--metrics",
    default=None,
    help="The coordinator's metrics endpoint (HOST:PORT or URL): which models are served and "
    "ready. Without it, models are those given with --package, taken as ready.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds a call waits for the coordinator at most (a request's deadline may be less).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Larger request bodies are answered 413.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback --listen: anyone who reaches the port can send requests.",
)
@curve_options
@click.option("--log-level", default="info", show_default=True)
def gateway(
    coordinator: str,
    listen: str,
    packages: tuple[str, ...],
    metrics: str | None,
    timeout: float,
    max_body_bytes: int,
    insecure: bool,
    curve_key: Path | None,
    server_key: Path | None,
    log_level: str,
) -> None:
    """Serve the OpenAI API and KServe's Open Inference Protocol v2 over HTTP, calling the
    coordinator through the SDK (docs/GATEWAY.md)."""
    setup_logging(log_level)
    host, port = _listen(listen, insecure)
    parsed = tuple(_package(p) for p in packages)
    keys = curve_keys(curve_key, server_key)
    import uvicorn

    from cicada.client import AsyncZmqTransport, CurveConfig
    from cicada.common.errors import CicadaError
    from cicada.gateway import GatewayConfig, create_app

    curve = None
    if keys is not None:
        curve = CurveConfig(keys.server_public, keys.public, keys.secret)
    try:  # a mistyped endpoint is a usage error now, not a failed start later
        AsyncZmqTransport(coordinator, curve=curve).close()
    except (ValueError, CicadaError) as exc:
        raise click.BadParameter(str(exc), param_hint="--coordinator") from None
    config = GatewayConfig(
        coordinator=coordinator, packages=parsed, metrics_url=_metrics_url(metrics),
        curve=curve, timeout=timeout, max_body_bytes=max_body_bytes,
    )  # fmt: skip
    try:
        app = create_app(config)
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"--listen {listen}: cannot bind ({exc.strerror})") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level.lower(), access_log=False, lifespan="on")
    )
    click.echo(f"gateway on http://{host}:{bound} for coordinator {coordinator}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    sock.close()
    if not server.started:  # the lifespan failed (e.g. a bad endpoint)
        sys.exit(1)
