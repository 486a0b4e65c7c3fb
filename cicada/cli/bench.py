"""`cicada coldstart`: cold-start a reference model once per loading strategy."""

from __future__ import annotations

from pathlib import Path

import click

from cicada.cli._common import fail
from cicada.common.errors import CicadaError


@click.command()
@click.option(
    "--model",
    default="gpt2-medium",
    show_default=True,
    help="Reference model to cold-start: gpt2-medium, gpt2-tiny, bert-base, resnet50.",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Where packages are kept (default: ~/.cache/cicada).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def coldstart(model: str, cache: Path | None, as_json: bool) -> None:
    """Cold-start a reference model once per strategy (cicada, meta, pisel, naive), side by side,
    each in a fresh process, with live residency progress."""
    from cicada.demos.cold_start import run_demo

    try:
        run_demo(model, cache, as_json)
    except CicadaError as exc:
        fail(exc)
