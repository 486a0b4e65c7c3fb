"""`cicada pack`: write a model package (manifest + safetensors), or verify one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cicada.cli._common import (
    batching_options,
    batching_settings,
    fail,
    padding_settings,
    read_config,
    trust_option,
)
from cicada.cloud.models import reference
from cicada.common.errors import CicadaError, PackageMismatchError


@click.command(epilog=reference.help_text())
@click.option(
    "--model",
    "factory",
    metavar="NAME|PKG.MODULE:FACTORY",
    help="A reference model by name (gpt2-tiny, gpt2-medium, ... listed below), or a "
    "callable returning an nn.Module, e.g. cicada.cloud.models.gpt2:build.",
)
@click.option(
    "--transformers",
    "transformers_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A transformers model directory as save_pretrained() writes it: config.json and "
    "model.safetensors (or shards with model.safetensors.index.json). The class is "
    "config.json's 'architectures' entry unless --transformers-class names one. Needs "
    "pip install 'cicada[hf]'.",
)
@click.option(
    "--transformers-class",
    "transformers_class",
    metavar="CLASS",
    help="A transformers model class, e.g. GPT2LMHeadModel, BertModel, LlamaForCausalLM. "
    "With --transformers: overrides the class config.json names. Alone: build CLASS from "
    "--config (its config.json) and pack --weights (or its random init).",
)
@click.option(
    "--transformers-output",
    "transformers_output",
    metavar="FIELD",
    help="Which field of a transformers model's output the package returns, e.g. "
    "pooler_output (default: the first, such as logits or last_hidden_state).",
)
@click.option(
    "--torchvision",
    "torchvision_name",
    metavar="NAME",
    help="A torchvision model by name, e.g. resnet50 or vit_b_16, with --weights from a "
    "local file (nothing is downloaded) and --config holding its keyword arguments, e.g. "
    "{\"num_classes\": 10}. Needs pip install 'cicada[vision]'.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON object: the factory's keyword arguments (--model), the model's config.json "
    "(--transformers-class) or the model's keyword arguments (--torchvision).",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="State dict to pack (.safetensors, or .pt/.pth read with weights_only=True). "
    "Without it the model's own initialisation is packed (seeded for cicada's models).",
)
@click.option("--out", type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--verify",
    "verify_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of packing: check a package as data (its manifest's and files' sha256, "
    "paths, byte ranges, header, stage checksums, that its factory is allowed), then "
    "exit. Imports no model code unless --check-model.",
)
@click.option(
    "--check-model",
    is_flag=True,
    help="With --verify: also build the model its manifest names (running its code: one of "
    "Cicada's own factories, or any with --trust-package-code) and check that it has exactly "
    "the package's tensors and aliases, with their shapes and dtypes.",
)
@batching_options(
    "the package's default for its workers, which a coordinator's config or "
    "`cicada cloud` options override; unset: "
)
@click.option(
    "--pad-sequences",
    is_flag=True,
    help="Let token requests of different lengths share a batch, each padded on the right with "
    "0 to the longest: only for a causal model (GPT-2) or one that masks its pad id 0 (MiniLM). "
    "What the model allows, so only the package says it (docs/PACKAGE.md `batching`).",
)
@click.option(
    "--sequence-outputs",
    default=None,
    metavar="I,J",
    help="With --pad-sequences: the outputs (by index) whose second dimension is the sequence, "
    "cut back to each request's length (GPT-2: 0, its logits; default: none).",
)
@trust_option
def pack(
    factory: str | None,
    transformers_dir: Path | None,
    transformers_class: str | None,
    transformers_output: str | None,
    torchvision_name: str | None,
    config_path: Path | None,
    weights: Path | None,
    out: Path | None,
    force: bool,
    verify_dir: Path | None,
    check_model: bool,
    max_batch_size: int | None,
    max_queue_delay_ms: float | None,
    preferred_batch_sizes: str | None,
    pad_sequences: bool,
    sequence_outputs: str | None,
    trust_package_code: bool,
) -> None:
    """Write a model package: manifest.json + safetensors weights in stage order.

    \b
    The model comes from one of:
      --model NAME [--config overrides.json] [--weights W]    (e.g. --model gpt2-tiny)
      --model PKG.MODULE:FACTORY [--config kwargs.json] [--weights W]
      --transformers DIR [--transformers-class CLASS]
      --transformers-class CLASS --config config.json [--weights W]
      --torchvision NAME [--config kwargs.json] [--weights W]
    """
    from rich.console import Console

    console = Console(stderr=True)
    try:
        if verify_dir is not None:
            from cicada.cloud.packing import verify_package

            with console.status(f"verifying {verify_dir}"):
                manifest = verify_package(
                    verify_dir, check_model=check_model, trusted=trust_package_code
                )
            click.echo(
                f"ok: {verify_dir}: {len(manifest.stages)} stages, {len(manifest.tensors())} "
                f"tensors, {manifest.total_bytes / 1e6:.1f} MB; sha256, paths, byte ranges "
                f"and stage checksums match; factory {manifest.architecture.factory}"
                + (" builds a model with exactly these tensors" if check_model else
                   " (not imported; --check-model builds it)")
            )  # fmt: skip
            if not manifest_sealed(verify_dir):
                click.echo(
                    "note: the manifest carries no manifest_sha256 (written by an older "
                    "cicada): its own bytes are not covered; re-pack to seal it",
                    err=True,
                )
            return
        sources = [factory, transformers_dir, torchvision_name]
        if transformers_dir is None:
            sources.append(transformers_class)
        if check_model:
            raise click.UsageError("--check-model goes with --verify")
        if sum(s is not None for s in sources) != 1 or out is None:
            raise click.UsageError(
                "pass --out and one of --model, --transformers, --transformers-class or "
                "--torchvision (or --verify DIR)"
            )
        batching = batching_settings(max_batch_size, max_queue_delay_ms, preferred_batch_sizes)
        batching |= padding_settings(pad_sequences, sequence_outputs)
        from cicada.cloud.batching import BatchConfigError, BatchPolicy

        try:
            BatchPolicy.of(batching)  # the settings must hold together (preferred <= max)
        except BatchConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-batch-size") from None
        config: dict[str, Any] = {}
        if factory is not None:
            factory, config = named_model(factory)
        if config_path is not None:
            config = {**config, **read_config(config_path)}
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        from cicada.cloud.packing import pack as pack_model

        loaded: Any = None
        label = factory
        if factory is None:
            factory, config, loaded = _library_model(
                transformers_dir, transformers_class, transformers_output, torchvision_name,
                config if config_path is not None else None, weights,
            )  # fmt: skip
            label = config.get("class_name") or config.get("name")
        elif transformers_output is not None:
            raise click.UsageError("--transformers-output goes with a transformers model")
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"packing {label}", total=None)
            try:
                manifest = pack_model(
                    factory,
                    out,
                    config=config,
                    weights=weights,
                    force=force,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                    model=loaded,
                    batching=batching,
                )
            except PackageMismatchError as exc:
                raise click.UsageError(f"--weights {weights}: {exc}") from None
        click.echo(
            f"wrote {out}: {len(manifest.stages)} stages ({manifest.staging_method}), "
            f"{manifest.total_bytes / 1e6:.1f} MB"
        )
        if manifest.staging_method == "whole":
            click.echo(f"note: {manifest.staging_note}", err=True)
    except CicadaError as exc:
        fail(exc)


def named_model(value: str) -> tuple[str, dict[str, Any]]:
    """(factory, config) for --model: a reference model's short name, or PKG.MODULE:FACTORY
    as given (with no config); anything else is a usage error naming the close match."""
    found = reference.resolve(value)
    if found is not None:
        return found.factory, dict(found.config)
    if ":" in value:
        return value, {}
    close = reference.close_match(value)
    hint = f"did you mean {close!r}? " if close else ""
    raise click.UsageError(
        f"--model {value!r} is neither a reference model nor PKG.MODULE:FACTORY; {hint}"
        f"reference models: {', '.join(reference.REFERENCE_MODELS)}"
    )


def manifest_sealed(package_dir: Path) -> bool:
    import json

    from cicada.common.package import MANIFEST_HASH_FIELD, MANIFEST_NAME

    try:
        return MANIFEST_HASH_FIELD in json.loads((package_dir / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return False


def _library_model(
    transformers_dir: Path | None,
    class_name: str | None,
    output: str | None,
    torchvision_name: str | None,
    config: dict[str, Any] | None,
    weights: Path | None,
) -> tuple[str, dict[str, Any], Any]:
    """(factory, factory config, loaded model or None) for a transformers or torchvision
    model; wrong combinations, missing extras and unknown names are usage errors."""
    from cicada.cloud import hub

    try:
        if transformers_dir is not None:
            if config is not None or weights is not None:
                raise click.UsageError(
                    "--transformers DIR takes config.json and weights from DIR; drop --config "
                    "and --weights (or use --transformers-class with them)"
                )
            model, spec, unused = hub.load_transformers_dir(transformers_dir, class_name, output)
            if unused:
                click.echo(
                    f"note: {len(unused)} tensors in {transformers_dir} are not used by "
                    f"{spec['class_name']} and are left out: {', '.join(unused[:5])}",
                    err=True,
                )
            return hub.TRANSFORMERS_FACTORY, spec, model
        if torchvision_name is not None:
            if output is not None or class_name is not None:
                raise click.UsageError("--transformers-* options do not go with --torchvision")
            return hub.TORCHVISION_FACTORY, hub.torchvision_spec(torchvision_name, config), None
        assert class_name is not None
        hub.transformers_class(class_name)
        if config is None:
            raise click.UsageError(
                "--transformers-class needs --config: the model's config.json (or pass a "
                "model directory with --transformers)"
            )
        spec = hub.transformers_spec(class_name, config, output=output)
        return hub.TRANSFORMERS_FACTORY, spec, None
    except (hub.MissingExtraError, hub.UnknownModelError, PackageMismatchError) as exc:
        raise click.UsageError(str(exc)) from None
