"""Shared steps of the strategies that load a whole state dict: ties, construction, apply, run.

Torch is imported inside the functions: strategy modules stay importable before `import torch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cicada.cloud.timeline import Timeline
from cicada.common.package import PAD_PREFIX, Manifest

if TYPE_CHECKING:
    import torch
    from torch import nn


def with_aliases(state: dict[str, torch.Tensor], manifest: Manifest) -> dict[str, torch.Tensor]:
    """The state dict with every tied name (the package stores one of each) filled in, and
    the weights file's padding entries (docs/PACKAGE.md) left out."""
    for name in [n for n in state if n.startswith(PAD_PREFIX)]:
        del state[name]
    for alias, target in manifest.aliases.items():
        state[alias] = state[target]
    return state


def forward(model: nn.Module, inputs: Any, timeline: Timeline) -> Any:
    import torch

    with timeline.span("compute", "forward"), torch.inference_mode():
        return model(inputs)


def construct(manifest: Manifest, timeline: Timeline, device: str = "cpu") -> nn.Module:
    """MiniLoader: init skipped. On the CPU as the ``meta`` strategy builds (without meta);
    on a GPU as ``meta`` does there (parameters on meta, buffers on the device), so that the
    peer's tensors are the only device copy of the weights."""
    import contextlib

    import torch

    from cicada.cloud.loading.meta import parameters_on_meta
    from cicada.cloud.miniloader import build_model

    arch = manifest.architecture
    placed: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if device != "cpu":
        placed = contextlib.ExitStack()
        placed.enter_context(parameters_on_meta())
        placed.enter_context(torch.device(device))
    with timeline.span("construct", "construct"), placed:
        return build_model(arch.factory, arch.config, init=False)


def apply_and_run(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    manifest: Manifest,
    inputs: Any,
    timeline: Timeline,
) -> Any:
    with timeline.span("apply", "load_state_dict(assign)"):
        model.load_state_dict(with_aliases(state, manifest), strict=True, assign=True)
    return forward(model, inputs, timeline)
