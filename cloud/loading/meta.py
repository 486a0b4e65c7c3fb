"""``meta``: what accelerate/transformers do: parameters on the meta device with init skipped,
a state dict from safetensors' mmap loader, `load_state_dict(assign=True)`, run."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import apply_and_run

if TYPE_CHECKING:
    from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """accelerate's init_empty_weights(include_buffers=False): parameters go to meta as they
    are registered; buffers (non-persistent ones included) are built for real."""
    from torch import nn

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


class MetaLoader(Loader):
    name = "meta"

    def run(self, inputs: Any) -> Any:
        import torch
        from safetensors.torch import load_file

        from cicada.cloud.miniloader import build_model

        manifest, timeline, device = self.manifest, self.timeline, self.device
        arch = manifest.architecture
        with timeline.span("construct", "construct"), parameters_on_meta(), torch.device(device):
            model: nn.Module = build_model(arch.factory, arch.config, init=False)
        with timeline.span("read", "safetensors mmap"):
            state = load_file(str(self.package_dir / manifest.weights), device=device)
        return apply_and_run(model, state, manifest, inputs, timeline)
