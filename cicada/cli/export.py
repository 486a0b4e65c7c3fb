"""`cicada export-edge`: export a small ONNX model for the edge agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cicada.cli._common import fail, read_config, trust_option
from cicada.common.errors import CicadaError


@click.command("export-edge")
@click.option(
    "--package",
    "package_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model package to cut the edge model from: its manifest names the factory and "
    "config, and tensors the edge variant shares with it (embeddings, first blocks, head) "
    "are copied.",
)
@click.option(
    "--model",
    "factory",
    metavar="NAME|PKG.MODULE:FACTORY",
    help="Instead of --package: a reference model by name (as `cicada pack --model`, e.g. "
    "gpt2-tiny) or the cloud model's factory, e.g. cicada.cloud.models.gpt2:build (the edge "
    "variant keeps its seeded initialisation).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --model: JSON object of the cloud model's factory keyword arguments.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write model.onnx (model.int8.onnx with --int8) and edge_model.json.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Write an int8 dynamic-quantized model: the one the agent serves. The fp32 graphs "
    "it is checked against are then left out unless --keep-fp32.",
)
@click.option(
    "--keep-fp32",
    is_flag=True,
    help="With --int8: keep the fp32 graphs too (for `cicada edge --fp32`).",
)
@click.option(
    "--full-depth",
    is_flag=True,
    help="Keep every layer (GPT-2's n_layer, BERT's num_hidden_layers, a transformers "
    "package's layer count) instead of a quarter: with --int8, the cloud model itself in int8, "
    "the draft that agrees with it best for speculative decoding. --shrink still applies.",
)
@click.option(
    "--shrink",
    "shrink_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a key of the edge config; VALUE is JSON (else a string). Repeatable, e.g. "
    "--shrink n_layer=2 --shrink 'layers=[1,2,1,1]'.",
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Token models: trace and check with this many tokens (the axis stays dynamic).",
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset version.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@trust_option
def export_edge_cmd(
    package_dir: Path | None,
    factory: str | None,
    config_path: Path | None,
    out: Path,
    int8: bool,
    keep_fp32: bool,
    full_depth: bool,
    shrink_items: tuple[str, ...],
    seq_len: int | None,
    opset: int,
    force: bool,
    trust_package_code: bool,
) -> None:
    """Export a small ONNX model for the edge agent, with the cloud model's signature.

    The edge variant is the same architecture with fewer layers (GPT-2: n_layer/4, BERT:
    num_hidden_layers/4, ResNet: one block per stage; every layer with --full-depth); it
    takes and returns what the cloud model does, with dynamic batch (and sequence) axes. Its
    weights are stand-ins for a distilled model. Before anything is written, ONNX Runtime and
    torch run the variant on the example input and must agree within the tolerances stated
    in edge_model.json.

    \b
    Examples:
      cicada export-edge --package pkg/gpt2 --out edge-models/gpt2 --int8
      cicada export-edge --package pkg/gpt2 --out edge-models/gpt2-full --int8 --full-depth
      cicada export-edge --model cicada.cloud.models.resnet:build --out edge-models/resnet \\
          --shrink width=32
    """
    if keep_fp32 and not int8:
        raise click.UsageError("--keep-fp32 goes with --int8 (without it fp32 is all there is)")
    if (package_dir is None) == (factory is None):
        raise click.UsageError("pass either --package DIR or --model FACTORY")
    if config_path is not None and factory is None:
        raise click.UsageError("--config goes with --model (a package carries its config)")
    config: dict[str, Any] | None = None
    if factory is not None:
        from cicada.cli.pack import named_model

        factory, named = named_model(factory)
        config = named or None
    if config_path is not None:
        config = {**(config or {}), **read_config(config_path)}
    shrink: dict[str, Any] = {}
    for item in shrink_items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--shrink {item!r} must look like KEY=VALUE")
        try:
            shrink[key.strip()] = json.loads(raw)
        except ValueError:
            shrink[key.strip()] = raw
    from cicada.cloud.export_edge import export_edge
    from cicada.common.factory import set_trust_package_code

    set_trust_package_code(trust_package_code)  # --package's factory; --model is yours
    try:
        info = export_edge(
            package_dir, out, factory=factory, config=config, shrink=shrink or None,
            int8=int8, seq_len=seq_len, opset=opset, force=force, keep_fp32=keep_fp32,
            full_depth=full_depth,
        )  # fmt: skip
    except CicadaError as exc:
        fail(exc)
        return
    report_export(info, out, package_dir)


def report_export(info: Any, out: Path, package_dir: Path | None) -> None:
    """What was checked, then every file written with its size, then the total."""
    tol, measured = info.tolerance, info.measured
    click.echo(
        f"checked: fp32 max |diff| vs torch {measured['fp32_max_abs']:.2g} (tolerance "
        f"{tol['max_abs']:g})"
    )
    if "int8" in info.files:
        check = (
            f"cosine vs torch {measured['int8_min_cosine']:.4f} (at least "
            f"{tol['int8_min_cosine']:g})"
            if "int8_min_cosine" in tol
            else f"max |diff| vs torch {measured['int8_max_abs']:.2g} (tolerance "
            f"{tol['int8_max_abs']:.2g}), argmax agreement {measured['int8_argmax_agreement']:.1%}"
        )
        click.echo(f"checked: int8 {check}")
    sig_in, sig_out = info.input, info.output
    click.echo(
        f"variant {info.variant}: {sig_in['name']} {sig_in['dtype']}{sig_in['shape']} -> "
        f"{sig_out['name']} {sig_out['dtype']}{sig_out['shape']} (-1: dynamic); "
        + (
            f"{info.copied_tensors} tensors copied from {package_dir}"
            if package_dir is not None
            else "seeded weights (no package)"
        )
    )
    total = 0
    for path in sorted(p for p in out.iterdir() if p.is_file()):
        size = path.stat().st_size
        total += size
        click.echo(f"wrote {path} ({_size(size)})")
    kept = "" if "fp32" in info.files or not info.int8 else "; fp32 graphs not kept (--keep-fp32)"
    click.echo(f"{out}: {_size(total)} in all{kept}")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10**5 else f"{n / 1e3:.1f} kB"
