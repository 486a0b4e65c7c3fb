"""``pisel``: layer by layer in lockstep (PISeL-style): for each stage, build it (initialise
its parameters), read its bytes, load them, run it; nothing overlaps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import forward
from cicada.cloud.timeline import Timeline
from cicada.common.package import Manifest

if TYPE_CHECKING:
    from torch import nn


class PiselLoader(Loader):
    name = "pisel"

    def run(self, inputs: Any) -> Any:
        return run_pisel(self.package_dir, self.manifest, inputs, self.device, self.timeline)


def run_pisel(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    import torch

    from cicada.cloud.miniloader import build_model, tensor_slots
    from cicada.cloud.packing import SAFETENSORS_TO_TORCH, check_coverage

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
        out = forward(model, inputs, timeline)
        for index in range(len(manifest.stages)):
            if index not in loaded:
                load_stage(index)
    finally:
        for h in hooks:
            h.remove()
        weights.close()
    assert set(tensor_slots(model)) == set(slots)
    return out
