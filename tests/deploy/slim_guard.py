"""Run `cicada ARGS` as it would run in a slim image: only some modules importable.

    CICADA_IMAGE_MODULES='["zmq", "numpy", ...]' python -m tests.deploy.slim_guard edge ...

Top-level modules outside that list, the standard library and the project's own packages
raise ModuleNotFoundError, as they would in an image built from a requirements file with
`pip install --no-deps .`; optional imports (`try: import x except ImportError`) see the
module as absent, as there. Every refused name is appended to CICADA_IMAGE_BLOCKED_LOG.
This module imports only the standard library.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import runpy
import sys
import sysconfig
from collections.abc import Sequence
from types import ModuleType
from typing import Any

PROJECT = {"cicada", "common", "cloud", "edge", "tests"}
# The interpreter's own library, for modules sys.stdlib_module_names leaves out (such as
# _sysconfigdata_*); site-packages below it is not part of it.
STDLIB = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})


def _in_stdlib(fullname: str, path: Sequence[str] | None) -> bool:
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    origin = spec.origin if spec is not None else None
    return bool(origin and origin.startswith(STDLIB) and "-packages" not in origin)


class ImageGuard(importlib.abc.MetaPathFinder):
    def __init__(self, allowed: set[str], log_path: str | None) -> None:
        self.allowed = allowed | PROJECT | set(sys.stdlib_module_names)
        self.log_path = log_path

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        top = fullname.partition(".")[0]
        if top in self.allowed or top in sys.builtin_module_names:
            return None  # let the normal finders look
        if fullname == top and _in_stdlib(fullname, path):
            return None
        if self.log_path:
            with open(self.log_path, "a") as log:
                log.write(top + "\n")
        raise ModuleNotFoundError(f"No module named {top!r} (not in this image)", name=top)


def main() -> None:
    allowed = set(json.loads(os.environ["CICADA_IMAGE_MODULES"]))
    sys.meta_path.insert(0, ImageGuard(allowed, os.environ.get("CICADA_IMAGE_BLOCKED_LOG")))
    sys.argv = ["cicada", *sys.argv[1:]]
    runpy.run_module("cicada", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
