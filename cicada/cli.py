"""The `cicada` command line. Each subcommand imports its role lazily: `cicada run` must reach
the weight reader before `import torch`, and edge-side commands must never import torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cicada.common.errors import CicadaError, PackageMismatchError


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cicada")
def main() -> None:
    """Cicada: edge-cloud cooperative inference that hides serverless cold starts.

    \b
    Typical flow:
      cicada pack --model cicada.cloud.models.gpt2:build --out pkg/gpt2   # make a model package
      cicada pack --verify pkg/gpt2                                # check it end to end
      cicada run pkg/gpt2 --input x.npy --out y.npy                # one timed cold start
      cicada demo                                                  # see it all at once
    """


@main.command()
@click.option(
    "--model",
    "factory",
    metavar="PKG.MODULE:FACTORY",
    help="Callable returning an nn.Module, e.g. cicada.cloud.models.gpt2:build.",
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
    help="Instead of packing: check a package's hashes, shapes and "
    "coverage against its model, then exit.",
)
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
) -> None:
    """Write a model package: manifest.json + safetensors weights in stage order.

    \b
    The model comes from one of:
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
                manifest = verify_package(verify_dir)
            click.echo(
                f"ok: {verify_dir}: {len(manifest.stages)} stages, {len(manifest.tensors())} "
                f"tensors, {manifest.total_bytes / 1e6:.1f} MB; sha256, stage checksums, "
                f"shapes and coverage match {manifest.architecture.factory}"
            )
            return
        sources = [factory, transformers_dir, torchvision_name]
        if transformers_dir is None:
            sources.append(transformers_class)
        if sum(s is not None for s in sources) != 1 or out is None:
            raise click.UsageError(
                "pass --out and one of --model, --transformers, --transformers-class or "
                "--torchvision (or --verify DIR)"
            )
        config: dict[str, Any] = {}
        if config_path is not None:
            try:
                config = json.loads(config_path.read_text())
            except ValueError as exc:
                raise click.UsageError(f"--config {config_path} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise click.UsageError(f"--config {config_path} must hold a JSON object")
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
        _fail(exc)


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
    from cicada.cloud.runner import run_cold_start

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
    help="gpt2-medium (1.4 GB), gpt2-tiny, or minilm: the pretrained all-MiniLM-L6-v2 pair "
    "(fp32 in the cloud, int8 ONNX on the edge) embedding real sentences sent as text.",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Where packages and edge models are kept (default: ~/.cache/cicada, or $CICADA_CACHE).",
)
@click.option(
    "--requests",
    "count",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in the burst [default: 60; minilm: 36].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Mean arrival rate of the burst (requests/s, Poisson) [default: 12; minilm: 4].",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    metavar="SENTENCE",
    help="minilm: a sentence to embed besides the built-in dozen (repeatable).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable summary: per request id, priority, served_by, latency, "
    "status (minilm: and the edge-cloud cosine similarity of its sentence).",
)
def demo(
    model: str,
    cache: Path | None,
    count: int | None,
    rate: float | None,
    texts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Coordinator + edge agent + a cold cloud worker, and a burst of mixed-priority requests.

    Packs the model and exports its int8 edge model once (cached), then starts the three roles
    as local processes and shows live where each request goes while the cloud cold-starts.
    With --model minilm the requests are sentences, and the report shows, next to each
    latency, the cosine similarity between the edge's and the cloud's embedding."""
    from cicada.live_demo import run_live_demo

    try:
        run_live_demo(model, cache, as_json, count, rate, texts)
    except CicadaError as exc:
        _fail(exc)


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
def coldstart(model: str, cache: Path | None, as_json: bool) -> None:
    """Cold-start a reference model once per strategy (cicada, meta, pisel, naive), side by side,
    each in a fresh process, with live residency progress."""
    from cicada.demo import run_demo

    try:
        run_demo(model, cache, as_json)
    except CicadaError as exc:
        _fail(exc)


# -- cicada invoke: one call through the coordinator (the client SDK, cicada/client.py) -------


@main.command()
@click.argument("model")
@click.option(
    "--input",
    "input_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An input tensor (.npy); repeat it for a model with several inputs, in order. For "
    "--max-new-tokens: the prompt's int64 token ids.",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    help="Text instead of --input, for a model packaged with a tokenizer; repeat for a batch.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, 4096),
    default=None,
    help="Generate this many tokens greedily from the prompt in --input, printing each as it "
    "arrives with the side (edge/cloud) that made it.",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 2),
    default=1,
    show_default=True,
    help="0 latency-critical, 1 normal, 2 quality-seeking.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the result stays useful; the coordinator answers TIMEOUT rather than late.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the reply at most.",
)
@click.option(
    "--address",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    envvar="CICADA_ADDRESS",
    show_envvar=True,
    help="The coordinator's endpoint.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the output here (.npy); further outputs go to OUT_1.npy, OUT_2.npy, ...",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def invoke(
    model: str,
    input_paths: tuple[Path, ...],
    texts: tuple[str, ...],
    max_new_tokens: int | None,
    priority: int,
    deadline: float | None,
    timeout: float,
    address: str,
    out_path: Path | None,
    as_json: bool,
) -> None:
    """Call MODEL once through the coordinator; print who served it and the timings.

    Exit status: 0 OK, 1 the call failed (TIMEOUT, REJECTED, UNAVAILABLE, BAD_REQUEST,
    FAILED, or a connection problem; the message says which), 2 usage error.
    """
    import numpy as np

    from cicada.client import Client
    from cicada.errors import ClientError, TransportError

    inputs = []
    for path in input_paths:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"--input {path} is not a readable .npy file: {exc}") from None
        if not isinstance(array, np.ndarray):
            raise click.UsageError(f"--input {path} holds several arrays; save each as .npy")
        inputs.append(array)
    if not inputs and not texts:
        raise click.UsageError("give the model's inputs with --input FILE.npy, or --text")
    try:
        client = Client(address, timeout=timeout)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        with client:
            stream = client.stream(
                model, inputs or None, text=list(texts) or None, max_new_tokens=max_new_tokens,
                priority=priority, deadline=deadline,
            )  # fmt: skip
            role = None
            for piece in stream:
                if as_json:
                    continue
                if piece.role != role:  # a new line whenever the side changes
                    click.echo(("\n" if role else "") + f"{piece.role}:", nl=False)
                    role = piece.role
                click.echo(" " + " ".join(str(int(t)) for t in piece.tokens), nl=False)
            if role is not None:
                click.echo()
            assert stream.result is not None
            result = stream.result
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except (ClientError, TransportError) as exc:
        if as_json:
            status = exc.status.value if exc.status is not None else None
            failure = {"status": status, "error": str(exc), "request_id": exc.request_id,
                       "served_by": exc.served_by, "side": getattr(exc, "side", None),
                       "retry_after": getattr(exc, "retry_after", None)}  # fmt: skip
            click.echo(json.dumps(failure))
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    written: list[Path | None] = []
    for i, array in enumerate(result.outputs):
        if out_path is None:
            written.append(None)
            continue
        path = out_path if i == 0 else out_path.with_name(f"{out_path.stem}_{i}.npy")
        with path.open("wb") as f:  # exactly the path asked for (np.save would add .npy)
            np.save(f, array, allow_pickle=False)
        written.append(path)
    if as_json:
        click.echo(json.dumps({
            "status": result.status.value, "request_id": result.request_id,
            "served_by": result.served_by, "timings": result.timings,
            "outputs": [{"dtype": a.dtype.name, "shape": list(a.shape),
                         "path": None if p is None else str(p)}
                        for a, p in zip(result.outputs, written, strict=True)],
        }))  # fmt: skip
        return
    who = result.served_by
    click.echo(
        f"{result.status.value}: served by {who.get('role', '?')} worker {who.get('worker', '?')}"
        f" (variant {who.get('variant') or '?'}), request {result.request_id}"
    )
    click.echo("timings: " + ", ".join(f"{name.removesuffix('_s')} {value:.4f} s"
                                       for name, value in result.timings.items()))  # fmt: skip
    for i, (array, saved) in enumerate(zip(result.outputs, written, strict=True)):
        where = "" if saved is None else f" -> {saved}"
        click.echo(f"output {i}: {array.dtype.name} {list(array.shape)}{where}")


@main.command("export-edge")
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
    metavar="PKG.MODULE:FACTORY",
    help="Instead of --package: the cloud model's factory, e.g. cicada.cloud.models.gpt2:build "
    "(the edge variant keeps its seeded initialisation).",
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
    help="Directory to write model.onnx, model.int8.onnx (--int8) and edge_model.json.",
)
@click.option("--int8", is_flag=True, help="Also write an int8 dynamic-quantized model.")
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
def export_edge_cmd(
    package_dir: Path | None,
    factory: str | None,
    config_path: Path | None,
    out: Path,
    int8: bool,
    shrink_items: tuple[str, ...],
    seq_len: int | None,
    opset: int,
    force: bool,
) -> None:
    """Export a small ONNX model for the edge agent, with the cloud model's signature.

    The edge variant is the same architecture with fewer layers (GPT-2: n_layer/4, BERT:
    num_hidden_layers/4, ResNet: one block per stage); it takes and returns what the cloud
    model does, with dynamic batch (and sequence) axes. Its weights are stand-ins for a
    distilled model. Before anything is written, ONNX Runtime and torch run the variant on
    the example input and must agree within the tolerances stated in edge_model.json.

    \b
    Examples:
      cicada export-edge --package pkg/gpt2 --out edge-models/gpt2 --int8
      cicada export-edge --model cicada.cloud.models.resnet:build --out edge-models/resnet \\
          --shrink width=32
    """
    if (package_dir is None) == (factory is None):
        raise click.UsageError("pass either --package DIR or --model FACTORY")
    if config_path is not None and factory is None:
        raise click.UsageError("--config goes with --model (a package carries its config)")
    config: dict[str, Any] | None = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise click.UsageError(f"--config {config_path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise click.UsageError(f"--config {config_path} must hold a JSON object")
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

    try:
        info = export_edge(
            package_dir, out, factory=factory, config=config, shrink=shrink or None,
            int8=int8, seq_len=seq_len, opset=opset, force=force,
        )  # fmt: skip
    except CicadaError as exc:
        _fail(exc)
        return
    tol, measured = info.tolerance, info.measured
    fp32 = info.files["fp32"]
    click.echo(
        f"wrote {out / fp32['path']}: fp32, {fp32['bytes'] / 1e6:.2f} MB, max |diff| vs torch "
        f"{measured['fp32_max_abs']:.2g} (tolerance {tol['max_abs']:g})"
    )
    if "int8" in info.files:
        q = info.files["int8"]
        check = (
            f"cosine vs torch {measured['int8_min_cosine']:.4f} (at least "
            f"{tol['int8_min_cosine']:g})"
            if "int8_min_cosine" in tol
            else f"max |diff| vs torch {measured['int8_max_abs']:.2g} (tolerance "
            f"{tol['int8_max_abs']:.2g}), argmax agreement {measured['int8_argmax_agreement']:.1%}"
        )
        click.echo(
            f"wrote {out / q['path']}: int8, {q['bytes'] / 1e6:.2f} MB "
            f"({q['bytes'] / fp32['bytes']:.0%} of fp32), {check}"
        )
    sig_in, sig_out = info.input, info.output
    click.echo(
        f"wrote {out / 'edge_model.json'}: variant {info.variant}, "
        f"{sig_in['name']} {sig_in['dtype']}{sig_in['shape']} -> "
        f"{sig_out['name']} {sig_out['dtype']}{sig_out['shape']} (-1: dynamic); "
        + (
            f"{info.copied_tensors} tensors copied from {package_dir}"
            if package_dir is not None
            else "seeded weights (no package)"
        )
    )


from cicada.serve_commands import register as _register_role_commands  # noqa: E402

_register_role_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
