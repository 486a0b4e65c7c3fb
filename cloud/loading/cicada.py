"""``cicada``: the cold-start pipeline (cloud/pipeline.py). Its reader starts when the loader is
opened, before `import torch`, so the weights stream in during the import."""

from __future__ import annotations

from typing import Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.pipeline import ColdStart
from cicada.common.package import Manifest


class CicadaLoader(Loader):
    name = "cicada"

    def open(self) -> Manifest:
        self.cold = ColdStart(self.package_dir, device=self.device, timeline=self.timeline)
        if self.on_residency is not None:
            self.cold.subscribe(self.on_residency)
        return self.cold.manifest

    def run(self, inputs: Any) -> Any:
        self.cold.build()
        return self.cold.forward(inputs)
