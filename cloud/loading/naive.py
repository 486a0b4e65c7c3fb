"""``naive``: build with init, read the whole weights file, `load_state_dict`, run."""

from __future__ import annotations

from typing import Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import forward, with_aliases


class NaiveLoader(Loader):
    name = "naive"

    def run(self, inputs: Any) -> Any:
        import torch
        from safetensors.torch import load_file

        from cicada.cloud.miniloader import build_model

        manifest, timeline = self.manifest, self.timeline
        arch = manifest.architecture
        with timeline.span("construct", "construct"), torch.device(self.device):
            model = build_model(arch.factory, arch.config, init=True)
        with timeline.span("read", "whole file"):
            state = load_file(str(self.package_dir / manifest.weights), device=self.device)
        with timeline.span("apply", "load_state_dict"):
            model.load_state_dict(with_aliases(state, manifest), strict=True)
        del state
        return forward(model, inputs, timeline)
