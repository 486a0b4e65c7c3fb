"""Model factories named as `package.module:callable`, resolved without importing torch here.

One resolver for every role that builds a model (the cloud's MiniLoader, packing, the warm
pool, the edge exporter). Packages written before everything moved under the `cicada` import
root name `cloud.models.gpt2:build`; `canonical_factory` maps those names so that they still load.

**Packages are data.** A manifest's factory is a string someone else wrote: resolving it
imports a module and calls it, as the invoking user. So a factory from a package is resolved
only if it is on `ALLOWED_FACTORIES` (Cicada's own builders, by exact name) or the operator
said they trust the package's code: `--trust-package-code` on the commands that load packages,
`trust_package_code = true` for the coordinator's launched workers, or `trust_package_code()`
in-process (as transformers' `trust_remote_code`). A factory the operator names themselves
(`cicada pack --model`, `cicada export-edge --model`) is their own choice and is resolved
with `trusted=True`. See docs/PACKAGE.md, "Threat model".
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from cicada.common.errors import PackageError, UntrustedCodeError

# Import roots that were top-level before the single `cicada` root (packages written by 0.1.0).
LEGACY_ROOTS = ("common", "cloud", "edge")

# Factories any package may name (after `canonical_factory`), by exact name: Cicada's own
# models and its transformers/torchvision builders. Anything else needs the trust flag.
ALLOWED_FACTORIES: frozenset[str] = frozenset(
    {
        "cicada.cloud.models.gpt2:build",
        "cicada.cloud.models.bert:build",
        "cicada.cloud.models.minilm:build",
        "cicada.cloud.models.resnet:build",
        "cicada.cloud.hub:transformers_model",
        "cicada.cloud.hub:torchvision_model",
    }
)
TRUST_FLAG = "--trust-package-code"

_trust = threading.local()
_trust_all = False  # set once by the CLI's --trust-package-code for the whole process


def canonical_factory(spec: str) -> str:
    """`cloud.models.gpt2:build` -> `cicada.cloud.models.gpt2:build`; other names unchanged."""
    root = spec.split(".", 1)[0].split(":", 1)[0]
    return f"cicada.{spec}" if root in LEGACY_ROOTS else spec


def factory_allowed(spec: str) -> bool:
    """True if a package may name `spec` without the operator's trust flag."""
    return canonical_factory(spec) in ALLOWED_FACTORIES


def set_trust_package_code(enabled: bool) -> None:
    """For the whole process: resolve any factory a package names (the CLI's trust flag)."""
    global _trust_all
    _trust_all = bool(enabled)


@contextmanager
def trust_package_code(enabled: bool = True) -> Iterator[None]:
    """Within this block, on this thread: resolve any factory a package names."""
    previous = getattr(_trust, "enabled", False)
    _trust.enabled = enabled
    try:
        yield
    finally:
        _trust.enabled = previous


def package_code_trusted() -> bool:
    return _trust_all or bool(getattr(_trust, "enabled", False))


def check_factory_allowed(spec: str, *, trusted: bool = False) -> None:
    """Raise `UntrustedCodeError` for a factory outside the allow-list, unless trusted."""
    if trusted or package_code_trusted() or factory_allowed(spec):
        return
    raise UntrustedCodeError(
        f"the package's factory {spec!r} is not one of Cicada's own model builders; its code "
        f"would run as you. Pass {TRUST_FLAG} if you trust this package's code (its module "
        f"is imported and called), else re-pack the model with an allowed factory: "
        f"{', '.join(sorted(ALLOWED_FACTORIES))}"
    )


def resolve_factory(
    spec: str, error: type[Exception] = PackageError, *, trusted: bool = False
) -> tuple[ModuleType, Callable[..., Any]]:
    """`pkg.module:callable` -> (module, callable), with errors (of type `error`) that say
    what to fix. A factory outside `ALLOWED_FACTORIES` is refused (`UntrustedCodeError`,
    before anything is imported) unless `trusted` or the trust flag is set."""
    check_factory_allowed(spec, trusted=trusted)
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
