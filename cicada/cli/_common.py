"""What the command modules share: failing with exit status 2, logging, endpoint and CURVE
options (one name per meaning in every command).

Plain click and the standard library only: importing it costs nothing (the CLI's modules
import their roles lazily, inside each command).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import click

from cicada.common.defaults import DEFAULT_ADDRESS
from cicada.common.endpoints import ENDPOINT_RULE, http_listener, http_url, zmq_endpoint
from cicada.common.errors import EndpointError

ADDRESS_HELP = f"The coordinator's endpoint: {ENDPOINT_RULE}."


def fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


class OptionError(click.ClickException):
    """An option's value cannot be used: one line naming the option and the value, never a
    traceback. Exit status 2 for a value that is wrong as typed, 1 for one that is taken."""

    exit_code = 2

    def __init__(self, option: str, why: str) -> None:
        super().__init__(f"{option}: {why}")

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class PortTaken(OptionError):
    """An option's address or port is in use, or cannot be listened on (exit status 1)."""

    exit_code = 1


def endpoint_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: a ZeroMQ endpoint as typed, normalised (HOST:PORT -> tcp://HOST:PORT)."""
    if value is None:
        return None
    try:
        return zmq_endpoint(value)
    except EndpointError as exc:
        raise OptionError(_flag(param), str(exc)) from None


def _flag(param: click.Parameter) -> str:
    return (getattr(param, "opts", None) or [f"--{param.name}"])[0]


def listener_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: an HTTP listener as HOST:PORT (a URL is accepted); 'off' passes."""
    if value is None or value == "off":
        return value
    try:
        host, port = http_listener(value)
    except EndpointError as exc:
        raise OptionError(_flag(param), str(exc)) from None
    return f"{host}:{port}"


def metrics_url_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback: a coordinator's metrics as HOST:PORT (as `cicada coordinator
    --metrics` takes it) or a URL; returns the URL of its /metrics."""
    try:
        return http_url(value)
    except EndpointError as exc:
        raise OptionError(_flag(param), str(exc)) from None


def coordinator_option(f: Any) -> Any:
    """`--coordinator ENDPOINT` (parameter `address`), normalised; the environment's
    CICADA_COORDINATOR is its default. `--address`, its older name, still works, hidden."""

    @functools.wraps(f)
    def merged(*args: Any, address_alias: str | None = None, **kwargs: Any) -> Any:
        if address_alias is not None:
            click.echo("note: --address is deprecated; use --coordinator", err=True)
            kwargs["address"] = address_alias
        return f(*args, **kwargs)

    merged = click.option(
        "--address",
        "address_alias",
        hidden=True,
        callback=endpoint_callback,
    )(merged)
    return click.option(
        "--coordinator",
        "address",
        default=DEFAULT_ADDRESS,
        show_default=True,
        envvar=["CICADA_COORDINATOR", "CICADA_ADDRESS"],
        show_envvar=True,
        callback=endpoint_callback,
        help=ADDRESS_HELP,
    )(merged)


def check_port_free(option: str, host: str, port: int) -> None:
    """Fail with one line if HOST:PORT cannot be listened on now (taken, or no such address),
    before a server thread finds out with a traceback."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OptionError(option, f"{host}:{port}: cannot resolve {host!r}: {exc}") from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP servers do
        try:
            probe.bind(where)
        except OSError as exc:
            raise PortTaken(option, f"{host}:{port}: {bind_problem(port, exc)}") from None


def bind_problem(port: int | str, exc: BaseException) -> str:
    """What a failed bind means, in words, with the next step."""
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        return f"port {port} is already in use (another coordinator?); choose a free port"
    if code == errno.EADDRNOTAVAIL:
        return "no such address on this machine; bind one of its addresses, or 0.0.0.0"
    if code == errno.EACCES:
        return f"not allowed to listen on port {port}; use a port above 1023"
    return f"cannot listen there: {exc}"


TRUST_HELP = (
    "Trust the package's code: import and call its factory even if it is not one of "
    "Cicada's own model builders (a package is data; its factory would run as you). "
    "See docs/PACKAGE.md, threat model."
)


def trust_option(f: Any) -> Any:
    """`--trust-package-code` (a bool parameter `trust_package_code`)."""
    return click.option("--trust-package-code", is_flag=True, help=TRUST_HELP)(f)


def batching_options(unset: str) -> Any:
    """`--max-batch-size`, `--max-queue-delay-ms`, `--preferred-batch-sizes` (Triton's dynamic
    batching settings), each None when not given; `unset` says what applies then."""

    def decorate(f: Any) -> Any:
        f = click.option(
            "--preferred-batch-sizes",
            default=None,
            help=f"Comma-separated batch sizes that go at once, without waiting out the delay "
            f"({unset}none).",
        )(f)
        f = click.option(
            "--max-queue-delay-ms",
            type=click.FloatRange(0, 60_000),
            default=None,
            help=f"How long the first dispatch of a batch may wait for others to join ({unset}0).",
        )(f)
        return click.option(
            "--max-batch-size",
            type=click.IntRange(1, 1024),
            default=None,
            help=f"Dynamic batching: run up to this many compatible dispatches as one forward, "
            f"advertised as the worker's capacity ({unset}1).",
        )(f)

    return decorate


def batching_settings(
    max_batch_size: int | None, max_queue_delay_ms: float | None, preferred: str | None
) -> dict[str, Any]:
    """The batching settings given as options, checked (docs/PACKAGE.md `batching`)."""
    settings: dict[str, Any] = {}
    if max_batch_size is not None:
        settings["max_batch_size"] = max_batch_size
    if max_queue_delay_ms is not None:
        settings["max_queue_delay_ms"] = max_queue_delay_ms
    if preferred is not None:
        settings["preferred_batch_sizes"] = _integers(preferred, "--preferred-batch-sizes")
    return _checked_batching(settings, "batching options", "--preferred-batch-sizes")


def padding_settings(pad: bool, outputs: str | None) -> dict[str, Any]:
    """`cicada pack --pad-sequences [--sequence-outputs I,J]` as batching settings, checked."""
    if outputs is not None and not pad:
        raise click.UsageError("--sequence-outputs goes with --pad-sequences")
    if not pad:
        return {}
    settings: dict[str, Any] = {"pad_sequences": True}
    if outputs is not None:
        settings["sequence_outputs"] = _integers(outputs, "--sequence-outputs")
    return _checked_batching(settings, "padding options", "--sequence-outputs")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint=option
        ) from None


def _checked_batching(settings: dict[str, Any], what: str, option: str) -> dict[str, Any]:
    from cicada.common.errors import PackageFormatError
    from cicada.common.package import parse_batching

    try:
        return parse_batching(settings, what)
    except PackageFormatError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def read_config(path: Path) -> dict[str, Any]:
    """A --config file: one JSON object, or a usage error that names the file."""
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise click.UsageError(f"--config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise click.UsageError(f"--config {path} must hold a JSON object")
    return config


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def curve_keys(key: Path | None, server_key: Path | None) -> Any:
    if key is None and server_key is None:
        return None
    if key is None or server_key is None:
        raise click.UsageError("CURVE needs both --curve-key and --server-key")
    from cicada.common.errors import CicadaError
    from cicada.common.sockets import CurveKeys

    try:
        return CurveKeys.load(key, server_key)
    except CicadaError as exc:  # not a key file, or a public key where the secret belongs
        raise OptionError("--curve-key", str(exc)) from None


def curve_options(f: Any) -> Any:
    f = click.option(
        "--server-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="The coordinator's public key file (NAME.key from `cicada keys`).",
    )(f)
    f = click.option(
        "--curve-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="This peer's secret key file (NAME.key_secret): turns CURVE on.",
    )(f)
    return f
