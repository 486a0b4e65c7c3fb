"""`cicada run`: one timed cold start of a package in this fresh process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cicada.cli._common import fail, trust_option
from cicada.common.errors import CicadaError


@click.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npy input: int64 token ids or a float tensor, as the model takes.",
)
@click.option(
    "--strategy",
    default="cicada",
    show_default=True,
    help="cicada | meta | naive | pisel, or peer-tensorizer | peer-runai | "
    "peer-fastsafetensors where installed (the `bench` extra); the registry is "
    "cicada.cloud.loading.registry.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the output tensor here (.npy).",
)
@click.option(
    "--timings",
    "timings_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the timing breakdown here (JSON).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads.")
@click.option(
    "--events",
    is_flag=True,
    help="Print each residency event (stage resident, bytes, elapsed, ETA) as a JSON "
    "line on stdout (cicada strategy).",
)
@trust_option
def run(
    package: Path,
    input_path: Path,
    strategy: str,
    out_path: Path | None,
    timings_path: Path | None,
    device: str,
    threads: int | None,
    events: bool,
    trust_package_code: bool,
) -> None:
    """One cold start of PACKAGE in this fresh process, then one forward on --input."""
    from cicada.cloud.runner import run_cold_start
    from cicada.common.factory import set_trust_package_code

    set_trust_package_code(trust_package_code)  # this process runs this one package

    try:
        timings = run_cold_start(
            package, input_path, strategy=strategy, device=device, out_path=out_path,
            timings_path=timings_path, threads=threads,
            on_residency=_print_event if events else None,
        )  # fmt: skip
    except CicadaError as exc:
        fail(exc)
        return
    click.echo(
        f"{strategy}: first result {timings['time_to_first_result_s']:.3f} s after launch "
        f"(import {timings['import_s']:.3f}, construct {timings['construct_s']:.3f}, "
        f"read {timings['read_s']:.3f}, compute {timings['compute_s']:.3f}); "
        f"peak RSS {timings['peak_rss_bytes'] / 2**20:.0f} MiB",
        err=True,
    )


def _print_event(event: Any) -> None:
    from dataclasses import asdict

    click.echo(json.dumps(asdict(event)))
