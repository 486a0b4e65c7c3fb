"""The strategies Cicada is measured against, in the same harness and on the same package.

* ``naive``  build with init, read the whole weights file, `load_state_dict`, run.
* ``pisel``  layer by layer in lockstep (PISeL-style): for each stage, build it (initialise its
             parameters), read its bytes, load them, run it; nothing overlaps.
* ``meta``   what accelerate/transformers do: parameters on the meta device with init skipped,
             a state dict from safetensors' mmap loader, `load_state_dict(assign=True)`, run.

Each takes (package dir, manifest, inputs, device, timeline) and returns the model output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cicada.cloud.miniloader import build_model, tensor_slots
from cicada.cloud.packing import SAFETENSORS_TO_TORCH, check_coverage
from cicada.cloud.timeline import Timeline
from cicada.common.package import Manifest

Baseline = Callable[[Path, Manifest, Any, str, Timeline], Any]


def _with_aliases(state: dict[str, torch.Tensor], manifest: Manifest) -> dict[str, torch.Tensor]:
    for alias, target in manifest.aliases.items():
        state[alias] = state[target]
    return state


def _forward(model: nn.Module, inputs: Any, timeline: Timeline) -> Any:
    with timeline.span("compute", "forward"), torch.inference_mode():
        return model(inputs)


def run_naive(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    from safetensors.torch import load_file

    arch = manifest.architecture
    with timeline.span("construct", "construct"), torch.device(device):
        model = build_model(arch.factory, arch.config, init=True)
    with timeline.span("read", "whole file"):
        state = load_file(str(package_dir / manifest.weights), device=device)
    with timeline.span("apply", "load_state_dict"):
        model.load_state_dict(_with_aliases(state, manifest), strict=True)
    del state
    return _forward(model, inputs, timeline)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """accelerate's init_empty_weights(include_buffers=False): parameters go to meta as they
    are registered; buffers (non-persistent ones included) are built for real."""
    original = nn.Module.register_parameter

    @functools.wraps(original)
    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def run_meta(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    from safetensors.torch import load_file

    arch = manifest.architecture
    with timeline.span("construct", "construct"), _parameters_on_meta(), torch.device(device):
        model = build_model(arch.factory, arch.config, init=False)
    with timeline.span("read", "safetensors mmap"):
        state = load_file(str(package_dir / manifest.weights), device=device)
    with timeline.span("apply", "load_state_dict(assign)"):
        model.load_state_dict(_with_aliases(state, manifest), strict=True, assign=True)
    return _forward(model, inputs, timeline)


def run_pisel(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    arch = manifest.architecture
    with timeline.span("construct", "skeleton"), torch.device(device):
        # The skeleton only; each stage is built (initialised) in its turn below.
        model = build_model(arch.factory, arch.config, init=False)
    slots = check_coverage(model, manifest)
    stage_of = {t.name: s.index for s in manifest.stages for t in s.tensors}
    for alias, target in manifest.aliases.items():
        stage_of[alias] = stage_of[target]
    loaded: set[int] = set()
    weights = open(package_dir / manifest.weights, "rb")  # noqa: SIM115 - closed below

    def load_stage(index: int) -> None:
        stage = manifest.stages[index]
        with timeline.span("construct", stage.name), torch.no_grad():
            for path in stage.modules:
                for m in model.get_submodule(path).modules() if path else ():
                    reset = getattr(m, "reset_parameters", None)
                    if callable(reset):
                        reset()
        with timeline.span("read", stage.name):
            weights.seek(stage.begin)
            raw = bytearray(weights.read(stage.nbytes))
        with timeline.span("apply", stage.name), torch.no_grad():
            for t in stage.tensors:
                src = torch.frombuffer(raw, dtype=torch.uint8, count=t.nbytes,
                                       offset=t.begin - stage.begin)  # fmt: skip
                value = src.view(SAFETENSORS_TO_TORCH[t.dtype]).view(t.shape)
                for slot in slots[t.name]:
                    slot.get().copy_(value)
        loaded.add(index)

    def lockstep(module: nn.Module, args: Any) -> None:
        for attr in [*module._parameters, *module._buffers]:
            name = names_of[id(module)] + attr
            index = stage_of.get(name)
            if index is not None and index not in loaded:
                # Everything before this stage is already loaded: strictly one at a time.
                for earlier in range(index + 1):
                    if earlier not in loaded:
                        load_stage(earlier)

    names_of = {id(m): (f"{p}." if p else "") for p, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lockstep) for m in model.modules()]
    try:
        with timeline.span("compute", "forward"), torch.inference_mode():
            out = model(inputs)
        for index in range(len(manifest.stages)):
            if index not in loaded:
                load_stage(index)
    finally:
        for h in hooks:
            h.remove()
        weights.close()
    assert set(tensor_slots(model)) == set(slots)
    return out


BASELINES: dict[str, Baseline] = {"naive": run_naive, "pisel": run_pisel, "meta": run_meta}
