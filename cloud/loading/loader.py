"""The load-strategy protocol: one cold start of a package, in two phases around `import torch`.

A strategy is a `Loader` subclass with a `name`, registered in cloud/loading/registry.py. Its
constructor runs *before* `import torch` and must not import it (the strategy modules import
torch inside `run` only; tests/test_lint.py checks that the registry stays torch-free): it opens
the package and starts whatever needs no torch (the ``cicada`` strategy starts its reader
there). `run(inputs)` runs after the import, on the lanes of `timeline`, and returns the
model's output. Every strategy takes the same arguments and gives bit-identical outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from cicada.cloud.loading.sources import device_kind
from cicada.cloud.timeline import Timeline
from cicada.common.errors import CicadaError
from cicada.common.factory import check_factory_allowed
from cicada.common.package import Manifest, check_weights_file


class Loader:
    name: ClassVar[str]
    # Device kinds it runs on; None: every kind that has a stage source (cpu, cuda).
    devices: ClassVar[tuple[str, ...] | None] = None
    # An optional library it needs: (import name, pip distribution), or None.
    library: ClassVar[tuple[str, str] | None] = None

    def __init__(
        self,
        package_dir: Path | str,
        *,
        device: str = "cpu",
        timeline: Timeline | None = None,
        on_residency: Callable[[Any], None] | None = None,
    ) -> None:
        device_kind(device, self.devices, who=f"strategy {self.name!r}")
        self.package_dir = Path(package_dir)
        self.device = device
        self.timeline = timeline if timeline is not None else Timeline()
        self.on_residency = on_residency
        self.manifest = self.open()

    def open(self) -> Manifest:
        """Open the package, before torch is imported."""
        manifest = Manifest.load(self.package_dir)
        # Refused before any byte is read, unless allow-listed or trusted (common/factory.py).
        check_factory_allowed(manifest.architecture.factory)
        check_weights_file(self.package_dir, manifest)
        return manifest

    def run(self, inputs: Any) -> Any:
        """Build, load and run the model on `inputs`; return its output."""
        raise NotImplementedError

    def import_library(self) -> ModuleType:
        """Import the optional `library`, timed on the "import" lane."""
        assert self.library is not None
        with self.timeline.span("import", self.library[0]):
            try:
                return importlib.import_module(self.library[0])
            except ImportError as exc:
                raise self.missing_library(exc) from None

    @classmethod
    def missing_library(cls, exc: ImportError) -> CicadaError:
        """The error for an optional `library` that cannot be imported."""
        pip = cls.library[1] if cls.library else "its library"
        return CicadaError(f"{cls.name} needs {pip}, which cannot be imported ({exc}); "
                           "install the benchmark extra: pip install -e '.[bench]'")  # fmt: skip

    @classmethod
    def prepare(cls, package_dir: Path | str) -> Path | None:
        """One-time work outside any timed run (e.g. a peer's own file format); returns the
        file it wrote, if any."""
        return None
