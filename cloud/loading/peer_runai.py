"""``peer-runai``: Run:ai model streamer's `SafetensorsStreamer`, streaming the package's
``weights.safetensors`` with its own reader threads to the CPU, or on a GPU (``--device
cuda``) to the device (its `device` argument) (peer loaders: see cloud/loading/registry.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import apply_and_run, construct

if TYPE_CHECKING:
    import torch


class RunaiLoader(Loader):
    name = "peer-runai"
    devices = ("cpu", "cuda")
    library = ("runai_model_streamer", "runai-model-streamer")

    def run(self, inputs: Any) -> Any:
        manifest, timeline = self.manifest, self.timeline
        runai = self.import_library()
        model = construct(manifest, timeline, self.device)
        state: dict[str, torch.Tensor] = {}
        with timeline.span("read", "SafetensorsStreamer"), runai.SafetensorsStreamer() as streamer:
            # owned=True (the default): each yielded tensor is the caller's to keep.
            streamer.stream_file(str(self.package_dir / manifest.weights), device=self.device)
            for name, tensor in streamer.get_tensors():
                # A version that streams to host memory only: the tensor goes on from there.
                state[name] = tensor.to(self.device, non_blocking=False)
        return apply_and_run(model, state, manifest, inputs, timeline)
