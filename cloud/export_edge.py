"""`cicada export-edge`: cut a small ONNX model for the edge agent out of a cloud model.

The edge variant is the cloud model's own factory called with a smaller config, so it takes
and returns exactly what the cloud model does (same input dtype and rank, same vocabulary or
class count): a request can be answered by either side without translation. Default shrink
rules for the reference models:

    cicada.cloud.models.gpt2:build    n_layer // 4 (at least 1); width, heads and vocabulary kept
    cicada.cloud.models.bert:build    num_hidden_layers // 4 (at least 1)
    cicada.cloud.models.resnet:build  layers (1, 1, 1, 1)
    cicada.cloud.models.minilm:build  nothing: the same pretrained model, where int8 is the trade
    cicada.cloud.hub (transformers)   a quarter of the layers (at least 1), eager attention, traced
                               with input_ids alone (the module's cicada_edge_config and
                               cicada_export_module hooks)

`shrink` overrides or adds config keys (and is the only rule for other factories).
`full_depth` keeps every layer (the rule's divisor becomes 1; a transformers package keeps its
layer count): with `int8`, the edge variant is the cloud model itself with int8 weights, the
draft that agrees with it best (issue 13: speculative drafting after the takeover).

Weights are stand-ins for a distilled edge model. Without a package the variant keeps the
factory's seeded initialisation. With a package, every tensor the variant shares by name and
shape with the packaged model is copied from the package (embeddings, the first k blocks, the
final norm and head): the usual starting point of layer-dropping distillation, but not a
trained edge model. A deployment would distil the variant and export that.

Output directory (names in `cicada.common.edge_model`): model.onnx (fp32), model.int8.onnx (with
`int8`: ONNX Runtime dynamic quantization, int8 weights), edge_model.json, and the package's
tokenizer.json when it has one (common/text.py: the edge agent then takes text), and for a
decoder with a cached step (`model.step(ids, past)`, the reference GPT-2) decoder.onnx (and
decoder.int8.onnx): the graph the edge agent generates with, keys and values kept between
tokens (prefill plus one cached step checked against torch). The export
checks itself before it writes anything: ONNX Runtime and torch run the same variant on the
example input and must agree within the tolerances stated in edge_model.json. With `int8`
the fp32 graphs are the int8 ones' reference in those checks and are then left out (the
agent serves int8), unless `keep_fp32`: a GPT-2-medium edge model is then ~180 MB, not ~1.7 GB.

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript-tracing exporter. In torch
2.13 the default (dynamo) exporter needs the onnxscript package, which Cicada does not depend
on; the tracing exporter ships with torch and handles these models with dynamic batch and
sequence axes (it warns that it is deprecated; the warning is silenced here).

An offline tool on the torch side (cloud/): the edge agent only reads what it writes, through
`cicada.common.edge_model` (names, signatures) and `cicada.edge.onnx_model` (ONNX Runtime).
Torch is still imported inside functions, so that `cicada` starts without it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cicada.common import factory as common_factory
from cicada.common.edge_model import (
    DECODER_INT8_NAME,
    DECODER_NAME,
    INFO_NAME,
    INT8_NAME,
    ONNX_NAME,
    TensorSpec,
    tensor_spec,
)
from cicada.common.errors import EdgeExportError
from cicada.common.files import replacing_dir
from cicada.common.package import Manifest, check_weights_file
from cicada.common.text import TOKENIZER_NAME

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# fp32: ONNX Runtime and torch compute the same graph with different kernels; measured
# max |diff| on the reference tiny models is 2e-7..7e-7, so 1e-4 leaves wide margin while
# still catching a wrong op or a specialised shape.
FP32_MAX_ABS = 1e-4
# int8 (dynamic quantization, int8 weights, uint8 activations): error scales with the output,
# so the bound is relative to max |torch output| on the example input. Measured on the tiny
# reference models: 0.8% (BERT), 1.1% (GPT-2), 2.2% (ResNet); 10% leaves a margin of 4.5x.
INT8_REL_TOL = 0.1
# Embedding models (unit vectors) are checked by cosine to torch instead: their max |diff| is
# not relative to anything useful. all-MiniLM-L6-v2 with per-channel int8 weights: measured
# cosine 0.986..0.998 on real sentences (per-tensor: 0.93..0.97, hence per channel).
MINILM_INT8_MIN_COSINE = 0.95


@dataclass(frozen=True)
class ShrinkRule:
    """How a known reference model shrinks: its layer-count key and that key's default."""

    family: str  # short name used in variant names, e.g. "gpt2"
    config_class: str  # the @dataclass config in the factory's module, for defaults ("": none)
    layer_key: str
    divisor: int = 4  # the edge keeps layers // divisor; 1: the same model (pretrained pair)
    per_channel: bool = False  # int8 weights quantized per output channel, not per tensor
    int8_min_cosine: float | None = None  # embedding models: check int8 by cosine to torch

    def shrink(self, full: Mapping[str, Any]) -> dict[str, Any]:
        value = full[self.layer_key]
        if isinstance(value, int):
            return {self.layer_key: max(1, value // self.divisor)}
        return {self.layer_key: [1] * len(value)}  # ResNet: one block per stage

    def tag(self, edge_config: Mapping[str, Any]) -> str:
        value = edge_config[self.layer_key]
        if isinstance(value, int):
            return f"L{value}"
        return "L" + "".join(str(v) for v in value)


SHRINK_RULES: dict[str, ShrinkRule] = {
    "cicada.cloud.models.gpt2:build": ShrinkRule("gpt2", "GPTConfig", "n_layer"),
    "cicada.cloud.models.bert:build": ShrinkRule("bert", "BertConfig", "num_hidden_layers"),
    "cicada.cloud.models.resnet:build": ShrinkRule("resnet", "ResNetConfig", "layers"),
    "cicada.cloud.models.minilm:build": ShrinkRule(
        "minilm", "", "num_hidden_layers", divisor=1, per_channel=True,
        int8_min_cosine=MINILM_INT8_MIN_COSINE,
    ),
}  # fmt: skip


@dataclass
class EdgeModelInfo:
    """What edge_model.json holds (`to_json`), plus where it was written (`out`)."""

    source_factory: str
    source_config: dict[str, Any]
    edge_config: dict[str, Any]
    variant: str  # the default file's variant: the int8 one when there is one
    input: dict[str, Any]  # {"name", "dtype", "shape"}, -1 for a dynamic axis
    output: dict[str, Any]
    int8: bool
    tolerance: dict[str, Any]
    copied_tensors: int
    files: dict[str, dict[str, Any]]  # "fp32"/"int8" -> {"path", "variant", "bytes"}
    measured: dict[str, float]  # max |onnxruntime - torch| on the example input, and more
    exporter: str
    opset: int
    out: Path
    full_depth: bool = False  # every layer kept (`full_depth`), not the shrink rule's share

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        del doc["out"]
        return doc


# -- the edge variant ------------------------------------------------------------------------


def resolve_factory(spec: str) -> tuple[Any, Callable[..., Any]]:
    """`pkg.module:callable` -> (module, callable), export errors naming what to fix."""
    return common_factory.resolve_factory(spec, EdgeExportError)


def _config_defaults(module: Any, rule: ShrinkRule) -> dict[str, Any]:
    if not rule.config_class:  # the source config is complete (a checkpoint's config.json)
        return {}
    cls = getattr(module, rule.config_class, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise EdgeExportError(f"{module.__name__} has no @dataclass {rule.config_class}")
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    # tuples (ResNet layers) become lists, as they would after a JSON round trip
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def edge_config_for(
    factory: str,
    source_config: Mapping[str, Any],
    shrink: Mapping[str, Any] | None = None,
    full_depth: bool = False,
) -> tuple[dict[str, Any], str]:
    """The edge variant's config and its variant name (without the "-int8" suffix).
    `full_depth`: keep every layer (the shrink rule's divisor is 1)."""
    module, _ = resolve_factory(factory)
    rule = SHRINK_RULES.get(common_factory.canonical_factory(factory))
    if rule is not None and full_depth:
        rule = dataclasses.replace(rule, divisor=1)
    hook = getattr(module, "cicada_edge_config", None)
    if rule is None and callable(hook):  # e.g. cicada.cloud.hub, whose configs nest the model's
        edge, tag = hook(dict(source_config))
        nested, source_nested = edge.get("config"), source_config.get("config")
        if full_depth and isinstance(nested, dict) and isinstance(source_nested, Mapping):
            for key in getattr(module, "LAYER_KEYS", ()):  # the hook's cut, undone
                if key in source_nested:
                    nested[key] = source_nested[key]
                    tag = f"L{source_nested[key]}"
        edge.update(shrink or {})
        return _jsonable(edge), f"{module.__name__.rsplit('.', 1)[-1]}-edge-{tag}"
    edge = dict(source_config)
    if rule is not None:
        full = {**_config_defaults(module, rule), **source_config}
        edge.update(rule.shrink(full))
    edge.update(shrink or {})
    edge = _jsonable(edge)
    if rule is None:
        family = module.__name__.rsplit(".", 1)[-1]
        return edge, f"{family}-edge"
    return edge, f"{rule.family}-edge-{rule.tag(edge)}"


def copy_package_tensors(model: nn.Module, package_dir: Path, manifest: Manifest) -> int:
    """Load the package's tensors into `model` where name and shape match; return how many
    of the model's state-dict entries were filled (tied names count once per name)."""
    from safetensors.torch import load_file

    weights = check_weights_file(package_dir, manifest)  # size and header, before any byte
    state = load_file(str(weights))
    for alias, stored in manifest.aliases.items():  # tied names are stored once
        if stored in state:
            state.setdefault(alias, state[stored])
    own = model.state_dict()
    matching = {
        name: tensor
        for name, tensor in state.items()
        if name in own and tuple(own[name].shape) == tuple(tensor.shape)
    }
    model.load_state_dict(matching, strict=False)
    return len(matching)


def build_edge_variant(
    factory: str, edge_config: Mapping[str, Any], package_dir: Path | None = None
) -> tuple[nn.Module, int]:
    """Build the edge variant in eval mode: seeded init, then the package's matching tensors
    when a package is given. Returns the model and the number of copied tensors."""
    import torch

    _, fn = resolve_factory(factory)
    try:
        model = fn(**edge_config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise EdgeExportError(f"{factory} rejects the edge config {edge_config}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise EdgeExportError(f"factory {factory!r} returned {type(model).__name__}, not a Module")
    copied = 0
    if package_dir is not None:
        copied = copy_package_tensors(model, Path(package_dir), Manifest.load(package_dir))
    module, _ = resolve_factory(factory)
    # e.g. cicada.cloud.hub's input_ids-only call
    wrap = getattr(module, "cicada_export_module", None)
    return (wrap(model) if callable(wrap) else model).eval(), copied


def example_input(
    factory: str,
    config: Mapping[str, Any],
    *,
    batch: int = 1,
    seed: int = 0,
    seq_len: int | None = None,
) -> torch.Tensor:
    """The factory module's `example_input(config, batch=, seed=)`, optionally stretched or cut
    to `seq_len` tokens (token models only: int64 of rank 2)."""
    module, _ = resolve_factory(factory)
    make = getattr(module, "example_input", None)
    if make is None:
        raise EdgeExportError(
            f"{module.__name__} has no example_input(config, batch, seed) to trace the "
            "export with: add one beside the factory"
        )
    x: torch.Tensor = make(config, batch=batch, seed=seed)
    if seq_len is not None:
        if x.dtype.is_floating_point or x.dim() != 2:
            raise EdgeExportError(
                f"seq_len applies to token models; {factory}'s input is {x.dtype} {list(x.shape)}"
            )
        if seq_len < 1:
            raise EdgeExportError(f"seq_len must be >= 1, got {seq_len}")
        x = x.repeat(1, math.ceil(seq_len / x.shape[1]))[:, :seq_len].contiguous()
    return x


def _forward(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    import torch

    try:
        with torch.no_grad():
            y = model(x)
    except Exception as exc:
        raise EdgeExportError(
            f"the edge variant fails on {what} {x.dtype} {list(x.shape)}: {exc}"
        ) from exc
    if not isinstance(y, torch.Tensor):
        raise EdgeExportError(
            f"the edge variant returns {type(y).__name__}; export needs one output tensor"
        )
    return y


def _changed_axes(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    if a.dim() != b.dim():
        raise EdgeExportError(
            f"the edge variant's output rank depends on the input ({list(a.shape)} vs "
            f"{list(b.shape)}): an ONNX graph needs a fixed rank"
        )
    return [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]


def dynamic_axes(model: nn.Module, x: torch.Tensor) -> dict[str, dict[int, str]]:
    """Which axes of the input and output are "batch" and "seq", found by running the model on
    a larger batch (and, for token models, a shorter sequence) and seeing which axes change."""
    import torch

    token_model = x.dtype == torch.int64 and x.dim() == 2
    y = _forward(model, x, "the example input")
    y_batch = _forward(model, torch.cat([x, x[:1]]), "a larger batch")
    axes_in: dict[int, str] = {0: "batch"}
    axes_out = {i: "batch" for i in _changed_axes(y, y_batch)}
    if token_model and x.shape[1] > 1:
        y_seq = _forward(model, x[:, :-1], "a shorter sequence")
        axes_in[1] = "seq"
        axes_out.update({i: "seq" for i in _changed_axes(y, y_seq)})
    return {INPUT_NAME: axes_in, OUTPUT_NAME: axes_out}


def export_onnx(
    model: nn.Module, x: torch.Tensor, path: Path, axes: dict[str, dict[int, str]], opset: int
) -> str:
    """Trace `model` on `x` into `path`; returns the exporter's name."""
    import torch

    try:
        with warnings.catch_warnings():
            # Asserts on shapes in forward() are traced as constants: true for every input
            # the checks below try, and the dynamic axes keep the graph general.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message=".*feature will be removed")
            # transformers' attention masks index with aranges (never negative), which the
            # exporter warns about in general; the fp32 check below runs the graph anyway.
            warnings.filterwarnings("ignore", message=".*aten::index operator of advanced")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise EdgeExportError(
            f"torch {torch.__version__}'s TorchScript ONNX exporter (dynamo=False) failed: "
            f"{exc}. (The dynamo exporter needs the onnxscript package, not a Cicada "
            "dependency.)"
        ) from exc
    return "torch.onnx.export(dynamo=False) (TorchScript tracing)"


def _step_module(model: Any) -> nn.Module:
    """`model.step` as a module's forward, for the tracer (defined here: this module must not
    import torch at import time)."""
    from torch import nn

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, past: torch.Tensor) -> Any:
            return self.model.step(ids, past)

    return Step().eval()


def export_decoder(
    model: Any, x: torch.Tensor, tmp: Path, opset: int, int8: bool, per_channel: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Export a decoder's cached step graph (a model with `step(ids, past)` and
    `empty_past()`, as cicada.cloud.models.gpt2) and check it: a prefill of `x` then one cached step
    must give torch's logits. Returns the files and what was measured."""
    import numpy as np
    import torch

    step = _step_module(model)
    layers, kv, batch, heads, _, head_size = model.empty_past(2).shape
    past = torch.randn(layers, kv, batch, heads, 3, head_size)
    path = tmp / DECODER_NAME
    axes = {"ids": {0: "batch", 1: "seq"}, "past": {2: "batch", 4: "past"},
            "logits": {0: "batch", 1: "seq"}, "present": {2: "batch", 4: "total"}}  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message=".*feature will be removed")
            torch.onnx.export(step, (x[:1].repeat(2, 1)[:, :5], past), str(path), dynamo=False,
                              input_names=["ids", "past"], output_names=["logits", "present"],
                              dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True)  # fmt: skip
    except Exception as exc:
        raise EdgeExportError(f"the cached decoder could not be exported: {exc}") from exc
    ids = x[:1]
    with torch.inference_mode():
        full = model(ids).numpy()
    files = {"decoder_fp32": {"path": DECODER_NAME, "bytes": path.stat().st_size}}
    measured = {"decoder_fp32_max_abs": _decoder_error(path, model, ids, full)}
    if not measured["decoder_fp32_max_abs"] <= FP32_MAX_ABS:
        raise EdgeExportError(
            f"the cached decoder and torch disagree: max |diff| "
            f"{measured['decoder_fp32_max_abs']:.3g} > {FP32_MAX_ABS:g}"
        )
    if int8:
        int8_path = tmp / DECODER_INT8_NAME
        quantize_int8(path, int8_path, per_channel=per_channel)
        error = _decoder_error(int8_path, model, ids, full)
        measured["decoder_int8_max_abs"] = error
        if not error <= INT8_REL_TOL * float(np.abs(full).max()):
            raise EdgeExportError(
                f"the int8 cached decoder and torch disagree: max |diff| {error:.3g}; "
                "export without --int8"
            )
        files["decoder_int8"] = {"path": DECODER_INT8_NAME, "bytes": int8_path.stat().st_size}
    return files, measured


def _decoder_error(path: Path, model: Any, ids: torch.Tensor, full: np.ndarray) -> float:
    """max |ORT - torch| over a prefill of all but the last token and one cached step."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = ids.numpy()
    past = model.empty_past(1).numpy()
    head, present = session.run(None, {"ids": x[:, :-1], "past": past})
    tail, _ = session.run(None, {"ids": x[:, -1:], "past": present})
    got = np.concatenate([head, tail], axis=1)
    return float(np.abs(got - full).max())


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def _without_log(prefix: str) -> Iterator[None]:
    root = logging.getLogger()
    drop = _DropRecords(prefix)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_int8(src: Path, dst: Path, per_channel: bool = False) -> None:
    """ONNX Runtime dynamic quantization: int8 weights (QInt8, one scale per tensor or per
    output channel), activations quantized per batch at run time. No calibration data needed,
    which suits a stand-in model."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # onnxruntime.quantization needs the onnx package
        raise EdgeExportError(
            f"int8 export needs onnxruntime.quantization and the onnx package ({exc}): "
            "pip install onnx"
        ) from exc
    # ORT suggests its shape pre-processing; its symbolic shape inference cannot complete
    # on graphs with dynamic sequence axes, and quantization is correct without it.
    with _without_log("Please consider"):
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             per_channel=per_channel)  # fmt: skip
        except Exception as exc:
            raise EdgeExportError(f"int8 quantization of {src} failed: {exc}") from exc


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {INPUT_NAME: x})[0])


def _signature(path: Path) -> tuple[TensorSpec, TensorSpec]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise EdgeExportError(f"{path}: expected one input and one output")
    return tensor_spec(inputs[0], path), tensor_spec(outputs[0], path)


def _check_int8(
    got: np.ndarray,
    expected: np.ndarray,
    rule: ShrinkRule | None,
    measured: dict[str, float],
    tolerance: dict[str, Any],
) -> None:
    """Hold the int8 model to its bound (relative max |diff|, or cosine for embeddings) and
    record what was measured and the bound in `measured` and `tolerance`."""
    import numpy as np

    scale = measured["output_scale"]
    measured["int8_max_abs"] = float(np.abs(got - expected).max())
    measured["int8_argmax_agreement"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
    weights = "per-channel" if rule is not None and rule.per_channel else "per-tensor"
    min_cosine = None if rule is None else rule.int8_min_cosine
    if min_cosine is not None:
        norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1)
        cosine = float(((got * expected).sum(-1) / np.maximum(norms, 1e-12)).min())
        measured["int8_min_cosine"] = cosine
        tolerance["int8_min_cosine"] = min_cosine
        within = cosine >= min_cosine
        bound_text = (
            "the output is an embedding, so the bound is cosine(onnxruntime, torch) >= "
            "int8_min_cosine on every row of the example input (int8_max_abs is recorded, "
            "not bounded)."
        )
        failure = f"cosine {cosine:.4f} < {min_cosine:g}"
    else:
        bound = INT8_REL_TOL * scale
        tolerance["int8_max_abs"] = bound
        tolerance["int8_rel_to_output_scale"] = INT8_REL_TOL
        within = measured["int8_max_abs"] <= bound
        bound_text = (
            f"max |diff| <= int8_max_abs = {INT8_REL_TOL:g} x max |torch output| "
            f"({scale:.4g}) on the example input; int8_argmax_agreement is over the last "
            "axis (meaningful for logits)."
        )
        failure = (
            f"max |diff| {measured['int8_max_abs']:.3g} > {bound:.3g} ({INT8_REL_TOL:g} x "
            "output scale)"
        )
    tolerance["note"] += f" int8 (dynamic quantization, QInt8 {weights} weights): {bound_text}"
    if not within:  # NaN included
        raise EdgeExportError(
            f"int8 ONNX and torch disagree on the example input: {failure}; this model does "
            "not quantize well: export without --int8"
        )


# -- the command ---------------------------------------------------------------------------


def _source(
    package_dir: Path | None, factory: str | None, config: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    if package_dir is not None:
        if factory is not None or config is not None:
            raise EdgeExportError("pass a package or a factory (+ config), not both")
        manifest = Manifest.load(package_dir)
        # The package's factory is data: refused before import unless allowed or trusted.
        common_factory.check_factory_allowed(manifest.architecture.factory)
        return manifest.architecture.factory, dict(manifest.architecture.config)
    if factory is None:
        raise EdgeExportError(
            "pass a package directory or a factory such as cicada.cloud.models.gpt2:build"
        )
    return factory, dict(config or {})


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgeExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdgeExportError(f"{out} already exists and is not empty; pass --force to replace it")


def export_edge(
    package_dir: Path | None,
    out: Path,
    *,
    factory: str | None = None,
    config: dict[str, Any] | None = None,
    shrink: dict[str, Any] | None = None,
    int8: bool = False,
    seq_len: int | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    keep_fp32: bool = False,
    full_depth: bool = False,
) -> EdgeModelInfo:
    """Export the edge variant of a packaged model (or of `factory` + `config`) to `out`.

    Writes model.onnx (model.int8.onnx instead with `int8`) and edge_model.json, after
    checking that ONNX Runtime reproduces torch on the example input within the stated
    tolerances; raises EdgeExportError otherwise and leaves `out` untouched. With `int8` the
    fp32 graphs (the int8 ones' reference in the checks) are not kept unless `keep_fp32`: the
    agent serves the int8 ones. A package's factory must be on the allow-list unless the
    package's code is trusted (common/factory.py).
    """
    out = Path(out).resolve()
    source_factory, source_config = _source(package_dir, factory, config)
    # A factory the operator named (--model) is their own choice; a package's was checked.
    with common_factory.trust_package_code(
        factory is not None or common_factory.package_code_trusted()
    ):
        return _export(package_dir, out, source_factory, source_config, shrink=shrink,
                       int8=int8, seq_len=seq_len, opset=opset, force=force,
                       keep_fp32=keep_fp32 or not int8, full_depth=full_depth)  # fmt: skip


def _export(
    package_dir: Path | None,
    out: Path,
    source_factory: str,
    source_config: dict[str, Any],
    *,
    shrink: dict[str, Any] | None,
    int8: bool,
    seq_len: int | None,
    opset: int,
    force: bool,
    keep_fp32: bool,
    full_depth: bool = False,
) -> EdgeModelInfo:
    import numpy as np

    edge_config, variant = edge_config_for(source_factory, source_config, shrink, full_depth)
    rule = SHRINK_RULES.get(common_factory.canonical_factory(source_factory))
    model, copied = build_edge_variant(source_factory, edge_config, package_dir)

    # Trace on batch 2 (a batch of 1 lets the tracer treat the batch axis as broadcastable)
    # and check on the example input proper, so a shape baked into the graph shows up.
    trace_x = example_input(source_factory, edge_config, batch=2, seed=1, seq_len=seq_len)
    check_x = example_input(source_factory, edge_config, batch=1, seed=0, seq_len=seq_len)
    axes = dynamic_axes(model, trace_x)
    expected = _forward(model, check_x, "the example input").numpy()
    scale = float(np.abs(expected).max())

    _check_out(out, force)
    # Replace by rename, as `cicada pack` does: a reader never sees half an edge model.
    with replacing_dir(out) as tmp:
        fp32_path = tmp / ONNX_NAME
        exporter = export_onnx(model, trace_x, fp32_path, axes, opset)
        measured: dict[str, float] = {"output_scale": scale}
        measured["fp32_max_abs"] = float(
            np.abs(_ort_run(fp32_path, check_x.numpy()) - expected).max()
        )
        if not measured["fp32_max_abs"] <= FP32_MAX_ABS:
            raise EdgeExportError(
                f"fp32 ONNX and torch disagree on the example input: max |diff| "
                f"{measured['fp32_max_abs']:.3g} > {FP32_MAX_ABS:g}"
            )
        files: dict[str, dict[str, Any]] = {
            "fp32": {"path": ONNX_NAME, "variant": variant, "bytes": fp32_path.stat().st_size}
        }
        tolerance: dict[str, Any] = {
            "max_abs": FP32_MAX_ABS,
            "note": "fp32: max |onnxruntime - torch| on the example input <= max_abs. "
            "Weights are stand-ins for a distilled model (seeded init and/or tensors copied "
            "from the package), so these bound the export, not the model's quality.",
        }
        if int8:
            int8_path = tmp / INT8_NAME
            quantize_int8(fp32_path, int8_path, per_channel=rule is not None and rule.per_channel)
            got = _ort_run(int8_path, check_x.numpy())
            _check_int8(got, expected, rule, measured, tolerance)
            files["int8"] = {
                "path": INT8_NAME,
                "variant": f"{variant}-int8",
                "bytes": int8_path.stat().st_size,
            }
        if callable(getattr(model, "step", None)) and callable(getattr(model, "empty_past", None)):
            decoder_files, decoder_measured = export_decoder(
                model, trace_x, tmp, opset, int8, rule is not None and rule.per_channel
            )
            files.update(decoder_files)
            measured.update(decoder_measured)
        tokenizer = None if package_dir is None else Path(package_dir) / TOKENIZER_NAME
        if tokenizer is not None and tokenizer.is_file():  # the agent then takes text too
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
            files["tokenizer"] = {"path": TOKENIZER_NAME, "bytes": tokenizer.stat().st_size}
        input_spec, output_spec = _signature(fp32_path)
        if not keep_fp32:  # only the int8 graphs are served: the fp32 ones were the reference
            for key in ("fp32", "decoder_fp32"):
                entry = files.pop(key, None)
                if entry is not None:
                    (tmp / entry["path"]).unlink()
        info = EdgeModelInfo(
            source_factory=source_factory,
            source_config=_jsonable(source_config),
            edge_config=edge_config,
            variant=files["int8"]["variant"] if int8 else files["fp32"]["variant"],
            input=input_spec.to_json(),
            output=output_spec.to_json(),
            int8=int8,
            tolerance=tolerance,
            copied_tensors=copied,
            files=files,
            measured=measured,
            exporter=exporter,
            opset=opset,
            out=out,
            full_depth=full_depth,
        )
        (tmp / INFO_NAME).write_text(json.dumps(info.to_json(), indent=1))
    return info
