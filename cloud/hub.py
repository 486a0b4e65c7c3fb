"""Models from transformers and torchvision, unmodified, as package factories.

A package names a factory and its JSON config (docs/PACKAGE.md); these two rebuild a library's
model from nothing but that config:

* ``cicada.cloud.hub:transformers_model`` - ``{"class_name": "GPT2LMHeadModel", "config": {...},
  "attn_implementation": "sdpa", "output": null}``: the transformers class, built from its
  config (the dict ``config.json`` holds) the way ``from_config`` builds it.
* ``cicada.cloud.hub:torchvision_model`` - ``{"name": "resnet50", "kwargs": {"num_classes": 10}}``:
  ``torchvision.models.get_model(name, weights=None, **kwargs)``.

Both libraries are optional extras (``cicada[hf]``, ``cicada[vision]``) imported only here, and
only when called: the core never needs them.

Construction without init. Under MiniLoader (``init=False``) torch's ``nn.init`` functions are
already no-ops for parameters, but transformers initialises through its own guarded copies of
them (``transformers.initialization``), which skip any tensor flagged ``_is_hf_initialized`` -
the flag ``from_pretrained`` sets on loaded weights. The factory flags every parameter just
before ``init_weights`` runs, so what follows (tying, non-persistent buffers such as rotary
``inv_freq`` recomputed by ``_init_weights``) happens exactly as in eager construction, and
only the parameter init, which the package overwrites, is skipped.

Outputs. transformers models return a ``ModelOutput``; a forward hook hands back its primary
tensor instead (``logits``, ``last_hidden_state``, or the field named by ``output``), which is
what a worker sends and what ``cicada run --out`` saves; a call with ``use_cache=True`` (a
generation step) gets the full output, cache included. The modules are untouched, so stage
detection, tensor names and tied weights are those of the library's own class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cicada.cloud.miniloader import parameter_init_skipped
from cicada.common.errors import (
    MissingExtraError,
    PackageError,
    PackageMismatchError,
    UnknownModelError,
)

TRANSFORMERS_FACTORY = "cicada.cloud.hub:transformers_model"
TORCHVISION_FACTORY = "cicada.cloud.hub:torchvision_model"


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingExtraError(
            f"transformers models need the transformers library ({exc}); pip install 'cicada[hf]'"
        ) from None
    return transformers


def _import_torchvision() -> Any:
    try:
        import torchvision.models
    except (ImportError, RuntimeError) as exc:
        # RuntimeError: torchvision built for another torch fails while registering its ops.
        raise MissingExtraError(
            f"torchvision models need a torchvision that imports beside this torch ({exc}); "
            "pip install 'cicada[vision]'"
        ) from None
    return torchvision.models


def transformers_class(class_name: str) -> Any:
    """The transformers model class called `class_name`, e.g. "GPT2LMHeadModel"."""
    transformers = _import_transformers()
    cls = getattr(transformers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnknownModelError(
            f"transformers {transformers.__version__} has no model class {class_name!r}; "
            "name one such as GPT2LMHeadModel, BertModel or LlamaForCausalLM (the "
            "'architectures' entry of a config.json)"
        )
    return cls


@contextmanager
def _hf_parameter_init_skipped(pretrained_model: Any) -> Iterator[None]:
    """Flag parameters as loaded right before transformers' `init_weights`, so its guarded
    initialisers skip them while tying and buffer init run as usual."""
    original = pretrained_model.init_weights

    def init_weights(self: Any) -> None:
        for param in self.parameters():
            param._is_hf_initialized = True
        original(self)

    pretrained_model.init_weights = init_weights
    try:
        yield
    finally:
        pretrained_model.init_weights = original


def transformers_model(
    class_name: str,
    config: dict[str, Any],
    attn_implementation: str | None = None,
    output: str | None = None,
) -> nn.Module:
    """Build transformers' `class_name` from `config` (a config.json dict), in eval mode.

    `attn_implementation` is fixed in the package so that a rebuild computes exactly as the
    model that was packed ("eager", "sdpa"); `output` names the field of the model's output
    to return (default: the first, e.g. logits)."""
    transformers = _import_transformers()
    cls = transformers_class(class_name)
    try:
        hf_config = cls.config_class.from_dict(dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        raise PackageError(f"{class_name} cannot take this config: {exc}") from exc
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if parameter_init_skipped():
        with _hf_parameter_init_skipped(transformers.PreTrainedModel):
            model = cls._from_config(hf_config, **kwargs)
    else:
        model = cls._from_config(hf_config, **kwargs)
    model.register_forward_hook(_primary_output(output), with_kwargs=True)
    built: nn.Module = model.eval()
    return built


def _primary_output(field: str | None) -> Any:
    def primary(module: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        if kwargs.get("use_cache"):
            return None  # a decoding step (cloud/generate.py) needs the cache: output as is
        if field is None:
            if hasattr(out, "to_tuple"):  # a ModelOutput: its first field that is set
                return out.to_tuple()[0]
            return out[0] if isinstance(out, tuple) else out
        value = out.get(field) if isinstance(out, dict) else getattr(out, field, None)
        if value is None:
            raise PackageError(
                f"{type(module).__name__} returned no {field!r}; its output has "
                f"{list(out.keys()) if isinstance(out, dict) else type(out).__name__}"
            )
        return value

    return primary


def cicada_preload(config: dict[str, Any]) -> list[str]:
    """What a warm pool imports ahead of a worker for a package built by these factories:
    the library and the model's class (its modeling code is imported lazily otherwise)."""
    if "class_name" in config:
        cls = transformers_class(str(config["class_name"]))
        return ["transformers", cls.__module__]
    _import_torchvision()
    return ["torchvision"]


# -- hooks for `cicada export-edge` (cloud/export_edge.py) ---------------------------------------

# The config keys transformers models use for their layer count.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def cicada_edge_config(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The default edge variant of a package built here: a transformers model with a quarter
    of its layers (at least one), the same width and vocabulary, eager attention (the tracing
    exporter cannot follow the sdpa path's mask helpers); a torchvision model as it is.
    Returns the factory config and a tag for the variant's name."""
    if "class_name" not in config:
        return dict(config), "same"
    hf = dict(config["config"])
    key = next((k for k in LAYER_KEYS if isinstance(hf.get(k), int)), None)
    if key is None:
        raise PackageError(f"{config['class_name']}'s config names no layer count {LAYER_KEYS}")
    hf[key] = max(1, hf[key] // 4)
    return {**config, "config": hf, "attn_implementation": "eager"}, f"L{hf[key]}"


def example_input(config: dict[str, Any], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic input to trace and check an export with: token ids (batch, up to 16) for
    a transformers model with a vocabulary, images (batch, 3, 224, 224) for torchvision."""
    gen = torch.Generator().manual_seed(seed)
    if "class_name" not in config:
        return torch.randn(batch, 3, 224, 224, generator=gen)
    hf = config["config"]
    vocab = hf.get("vocab_size")
    if not isinstance(vocab, int):
        raise PackageError(f"{config['class_name']} takes no token ids (no vocab_size)")
    positions = hf.get("max_position_embeddings") or hf.get("n_positions") or 16
    return torch.randint(0, vocab, (batch, min(16, int(positions))), generator=gen)


class _TokenIdsOnly(nn.Module):
    """A transformers model called with `input_ids` alone: the tracer then sees one input
    (called positionally, optional arguments such as logits_to_keep became graph inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids)


def cicada_export_module(model: nn.Module) -> nn.Module:
    """What `cicada export-edge` traces for a model built here."""
    if hasattr(model, "config"):  # a transformers model
        return _TokenIdsOnly(model).eval()
    return model


def torchvision_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """torchvision's model `name` (e.g. resnet50, vit_b_16) with its own constructor and no
    pretrained weights; `kwargs` as `torchvision.models.get_model` takes them."""
    models = _torchvision_models(name)
    model: nn.Module = models.get_model(name, weights=None, **(kwargs or {}))
    return model.eval()


def _torchvision_models(name: str) -> Any:
    models = _import_torchvision()
    if name not in models.list_models():
        raise UnknownModelError(
            f"torchvision has no model {name!r}; torchvision.models.list_models() names them, "
            "e.g. resnet50, vit_b_16"
        )
    return models


# -- what `cicada pack` calls ---------------------------------------------------------------


def transformers_spec(
    class_name: str,
    config: dict[str, Any],
    attn_implementation: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """The factory config that rebuilds `class_name` from `config` (checked by building it)."""
    transformers_class(class_name)
    spec: dict[str, Any] = {"class_name": class_name, "config": config}
    if attn_implementation is not None:
        spec["attn_implementation"] = attn_implementation
    if output is not None:
        spec["output"] = output
    return spec


def torchvision_spec(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The factory config that rebuilds torchvision's `name` (checked to exist)."""
    _torchvision_models(name)
    return {"name": name, "kwargs": dict(kwargs or {})}


def load_transformers_dir(
    directory: Path, class_name: str | None = None, output: str | None = None
) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """Load a saved model directory (config.json + model.safetensors, or shards with their
    model.safetensors.index.json) with `from_pretrained`, which knows the library's checkpoint
    conventions (tied weights left out, renamed keys, dtype).

    Returns the model, the factory config that rebuilds it, and checkpoint tensors the model
    does not use (from_pretrained drops them; a head saved with a base model, say). A tensor the
    model lacks or whose shape differs is a `PackageMismatchError`: transformers would fill it
    with random values, and a package must never hold those."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise PackageError(
            f"{directory} has no config.json; pass a directory written by save_pretrained()"
        )
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise PackageError(f"{config_file} is not valid JSON: {exc}") from None
    if class_name is None:
        names = raw.get("architectures") if isinstance(raw, dict) else None
        if not names:
            raise PackageError(
                f"{config_file} names no 'architectures'; pass the class with "
                "--transformers-class (e.g. BertModel)"
            )
        class_name = str(names[0])
    cls = transformers_class(class_name)
    if not any(directory.glob("*.safetensors")):
        raise PackageError(
            f"{directory} holds no .safetensors weights (model.safetensors, or shards and "
            "model.safetensors.index.json); save them with save_pretrained()"
        )
    try:
        model, info = cls.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except Exception as exc:  # the library's own errors vary by cause and version
        raise PackageError(
            f"transformers could not load {directory} as {class_name}: {type(exc).__name__}: {exc}"
        ) from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise PackageMismatchError(
            f"{directory} does not fit {class_name}: tensors the checkpoint lacks {missing[:5]}, "
            f"shapes that differ {mismatched[:5]}; check config.json and the class"
        )
    spec = transformers_spec(
        class_name,
        json.loads(model.config.to_json_string(use_diff=False)),
        attn_implementation=model.config._attn_implementation,
        output=output,
    )
    model.register_forward_hook(_primary_output(output), with_kwargs=True)
    return model.eval(), spec, sorted(info.get("unexpected_keys") or ())
