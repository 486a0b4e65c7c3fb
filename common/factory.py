"""Model factories named as `package.module:callable`, resolved without importing torch here.

One resolver for every role that builds a model (the cloud's MiniLoader, packing, the warm
pool, the edge exporter). Packages written before everything moved under the `cicada` import
root name `cloud.models.gpt2:build`; `canonical_factory` maps those names so that they still load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from cicada.common.errors import PackageError

# Import roots that were top-level before the single `cicada` root (packages written by 0.1.0).
LEGACY_ROOTS = ("common", "cloud", "edge")


def canonical_factory(spec: str) -> str:
    """`cloud.models.gpt2:build` -> `cicada.cloud.models.gpt2:build`; other names unchanged."""
    root = spec.split(".", 1)[0].split(":", 1)[0]
    return f"cicada.{spec}" if root in LEGACY_ROOTS else spec


def resolve_factory(
    spec: str, error: type[Exception] = PackageError
) -> tuple[ModuleType, Callable[..., Any]]:
    """`pkg.module:callable` -> (module, callable), with errors (of type `error`) that say
    what to fix."""
    module_name, sep, attr = canonical_factory(spec).partition(":")
    if not sep or not module_name or not attr:
        raise error(f"factory {spec!r} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import {module_name!r} for factory {spec!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise error(f"{module_name!r} has no attribute {attr!r} (factory {spec!r})")
    if not callable(target):
        raise error(f"factory {spec!r} is not callable")
    return module, target
