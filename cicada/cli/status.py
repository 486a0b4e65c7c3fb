"""`cicada status`: a coordinator's workers, queues and outcomes, from its /metrics."""

from __future__ import annotations

import json

import click

from cicada.cli._common import metrics_url_callback
from cicada.common.defaults import (
    DEFAULT_METRICS,
)
from cicada.common.errors import CicadaError


@click.command()
@click.option(
    "--metrics",
    "url",
    default=DEFAULT_METRICS,
    show_default=True,
    callback=metrics_url_callback,
    help="The coordinator's metrics endpoint: HOST:PORT, as given to `cicada coordinator "
    "--metrics` (a URL http://HOST:PORT/metrics means the same).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the parsed metrics as JSON.")
def status(url: str, as_json: bool) -> None:
    """Show a coordinator's workers, queues and request outcomes (from its /metrics)."""
    from cicada.edge.coordinator.status import fetch_status, render_status

    try:
        snapshot = fetch_status(url)
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(snapshot, indent=1))
    else:
        render_status(snapshot)
