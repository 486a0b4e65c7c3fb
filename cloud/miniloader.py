"""MiniLoader: build a model's modules without paying for parameter initialisation.

Construction runs the model's own `__init__` on the target device with every `torch.nn.init`
function turned into a no-op *for parameters*. Parameters come out as `torch.empty` storage
that is never touched (so it costs neither time nor resident memory) and is dropped when the
checkpoint's tensor takes its place. Everything the checkpoint does not hold (non-persistent
buffers such as rotary tables or position ids, which models compute with ordinary tensor ops)
is built exactly as eager construction builds it, and ties between modules (a shared
Parameter) are kept because they are made by the constructor itself.

Why not the meta device: `nn.init` on meta tensors imports torch._dynamo and sympy (~0.8 s
here), and meta loses non-persistent buffers, which must then be recomputed by hand.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cicada.common import factory as common_factory
from cicada.common.errors import PackageError

# Every in-place initialiser in torch.nn.init that modules call from reset_parameters().
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)  # fmt: skip
_patch_lock = threading.RLock()
_skipping = threading.local()


def parameter_init_skipped() -> bool:
    """True inside `skip_parameter_init` on this thread. Factories for libraries that
    initialise through their own functions (transformers) use it to skip that init too."""
    return getattr(_skipping, "depth", 0) > 0


@contextmanager
def skip_parameter_init() -> Iterator[None]:
    """Make `torch.nn.init.*_` return parameters untouched; other tensors are initialised."""
    originals: dict[str, Callable[..., Any]] = {}

    def passthrough(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if isinstance(tensor, nn.Parameter):
                return tensor
            return original(tensor, *args, **kwargs)

        return init

    with _patch_lock:
        for name in _INIT_FUNCTIONS:
            original = getattr(nn.init, name, None)
            if original is not None:
                originals[name] = original
                setattr(nn.init, name, passthrough(original))
        _skipping.depth = getattr(_skipping, "depth", 0) + 1
        try:
            yield
        finally:
            _skipping.depth -= 1
            for name, original in originals.items():
                setattr(nn.init, name, original)


def resolve_factory(spec: str, *, trusted: bool = False) -> Callable[..., nn.Module]:
    """`pkg.module:callable` -> the callable, with errors that say what to fix. A factory
    outside the allow-list needs `trusted` or the trust flag (common/factory.py)."""
    _, factory = common_factory.resolve_factory(spec, trusted=trusted)
    return factory


def build_model(
    factory: str, config: dict[str, Any], *, init: bool, trusted: bool = False
) -> nn.Module:
    """Call the factory; with `init=False` parameters are left uninitialised (MiniLoader).
    `trusted`: the caller named the factory itself (`cicada pack --model`), not a package."""
    fn = resolve_factory(factory, trusted=trusted)
    try:
        if init:
            model = fn(**config)
        else:
            with skip_parameter_init():
                model = fn(**config)
    except (TypeError, ValueError) as exc:
        # Most often a config the factory does not accept (an edited or mismatched manifest).
        raise PackageError(
            f"factory {factory} refused its config {config}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise PackageError(f"factory {factory!r} returned {type(model).__name__}, not nn.Module")
    return model.eval()


@dataclass(frozen=True)
class Slot:
    """One place a state-dict tensor lives: `module.<attr>` as a parameter or buffer."""

    module: nn.Module
    attr: str
    is_parameter: bool

    def get(self) -> torch.Tensor:
        table = self.module._parameters if self.is_parameter else self.module._buffers
        value = table[self.attr]
        assert value is not None
        return value


def tensor_slots(model: nn.Module) -> dict[str, list[Slot]]:
    """State-dict name -> its slot(s), shared modules and tied tensors included.

    Mirrors `state_dict()`: parameters and persistent buffers only.
    """
    slots: dict[str, list[Slot]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for attr, param in module._parameters.items():
            if param is not None:
                slots.setdefault(prefix + attr, []).append(Slot(module, attr, True))
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                slots.setdefault(prefix + attr, []).append(Slot(module, attr, False))
    return slots
