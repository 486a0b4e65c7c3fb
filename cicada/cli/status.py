"""`cicada status`: a coordinator's workers (residency, ETA), queues by priority, latency and
outcomes, from its /metrics and /status.json."""

from __future__ import annotations

import json
from typing import Any

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
    "--metrics` (a URL http://HOST:PORT/metrics means the same); its /status.json is read "
    "from the same port.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print the parsed metrics as JSON, with the /status.json document under "live".',
)
def status(url: str, as_json: bool) -> None:
    """Show a coordinator's workers with their residency and ETA, its queues by priority, the
    latency (p50/p99) of its last answered requests per model and route, and the request
    outcomes since it started. The same port serves the live page at / (docs/STATUS.md)."""
    from cicada.edge.coordinator.status import fetch_live, fetch_status, render_status

    try:
        snapshot = fetch_status(url)
    except CicadaError as exc:
        raise click.ClickException(str(exc)) from None
    live: dict[str, Any] | None
    try:
        live = fetch_live(url)
    except CicadaError as exc:  # e.g. an older coordinator: the counts /metrics has, and why
        live, why = None, str(exc)
    if as_json:
        click.echo(json.dumps({**snapshot, "live": live}, indent=1))
        return
    render_status(snapshot, live)
    if live is None:
        click.echo(f"no residency, queues by priority or latency: {why}", err=True)
