"""What the command modules share: failing with exit status 2, logging, CURVE options.

Plain click and the standard library only: importing it costs nothing (the CLI's modules
import their roles lazily, inside each command).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

ADDRESS_HELP = "Coordinator endpoint to connect to."


def fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


TRUST_HELP = (
    "Trust the package's code: import and call its factory even if it is not one of "
    "Cicada's own model builders (a package is data; its factory would run as you). "
    "See docs/PACKAGE.md, threat model."
)


def trust_option(f: Any) -> Any:
    """`--trust-package-code` (a bool parameter `trust_package_code`)."""
    return click.option("--trust-package-code", is_flag=True, help=TRUST_HELP)(f)


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
    from cicada.common.sockets import CurveKeys

    return CurveKeys.load(key, server_key)


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
