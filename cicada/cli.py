"""The `cicada` command line. Each subcommand imports its role lazily: `cicada run` must reach
the weight reader before `import torch`, and edge-side commands must never import torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from common.errors import CicadaError


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cicada")
def main() -> None:
    """Cicada: edge-cloud cooperative inference that hides serverless cold starts.

    \b
    Typical flow:
      cicada pack --model cloud.models.gpt2:build --out pkg/gpt2   # make a model package
      cicada pack --verify pkg/gpt2                                # check it end to end
      cicada run pkg/gpt2 --input x.npy --out y.npy                # one timed cold start
      cicada demo                                                  # see it all at once
    """


@main.command()
@click.option(
    "--model",
    "factory",
    metavar="PKG.MODULE:FACTORY",
    help="Callable returning an nn.Module, e.g. cloud.models.gpt2:build.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON object passed to the factory as keyword arguments.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="State dict to pack (.safetensors, or .pt read with weights_only=True). "
    "Without it the factory's own (seeded) initialisation is packed.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--verify",
    "verify_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of packing: check a package's hashes, shapes and "
    "coverage against its model, then exit.",
)
def pack(
    factory: str | None,
    config_path: Path | None,
    weights: Path | None,
    out: Path | None,
    force: bool,
    verify_dir: Path | None,
) -> None:
    """Write a model package: manifest.json + safetensors weights in stage order."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        if verify_dir is not None:
            from cloud.packing import verify_package

            with console.status(f"verifying {verify_dir}"):
                manifest = verify_package(verify_dir)
            click.echo(
                f"ok: {verify_dir}: {len(manifest.stages)} stages, {len(manifest.tensors())} "
                f"tensors, {manifest.total_bytes / 1e6:.1f} MB; sha256, stage checksums, "
                f"shapes and coverage match {manifest.architecture.factory}"
            )
            return
        if not factory or out is None:
            raise click.UsageError("pass --model and --out (or --verify DIR)")
        config: dict[str, Any] = {}
        if config_path is not None:
            try:
                config = json.loads(config_path.read_text())
            except ValueError as exc:
                raise click.UsageError(f"--config {config_path} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise click.UsageError(f"--config {config_path} must hold a JSON object")
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        from cloud.packing import pack as pack_model

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"packing {factory}", total=None)
            manifest = pack_model(
                factory,
                out,
                config=config,
                weights=weights,
                force=force,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        click.echo(
            f"wrote {out}: {len(manifest.stages)} stages ({manifest.staging_method}), "
            f"{manifest.total_bytes / 1e6:.1f} MB"
        )
        if manifest.staging_method == "whole":
            click.echo(f"note: {manifest.staging_note}", err=True)
    except CicadaError as exc:
        _fail(exc)


@main.command()
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
    help="cicada | pisel | naive | meta, or peer-tensorizer | peer-runai | "
    "peer-fastsafetensors where installed (the `bench` extra).",
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
def run(
    package: Path,
    input_path: Path,
    strategy: str,
    out_path: Path | None,
    timings_path: Path | None,
    device: str,
    threads: int | None,
    events: bool,
) -> None:
    """One cold start of PACKAGE in this fresh process, then one forward on --input."""
    from cloud.runner import run_cold_start

    try:
        timings = run_cold_start(
            package, input_path, strategy=strategy, device=device, out_path=out_path,
            timings_path=timings_path, threads=threads,
            on_residency=_print_event if events else None,
        )  # fmt: skip
    except CicadaError as exc:
        _fail(exc)
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


@main.command()
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
def demo(model: str, cache: Path | None, as_json: bool) -> None:
    """Pack a reference model (once), then cold-start it with each strategy, side by side."""
    from cicada.demo import run_demo

    try:
        run_demo(model, cache, as_json)
    except CicadaError as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
