"""``peer-fastsafetensors``: fastsafetensors' `SafeTensorsFileLoader` with ``nogds=True`` and
device cpu: pread into host buffers, no GPUDirect Storage (peer loaders: see
cloud/loading/registry.py)."""

from __future__ import annotations

from typing import Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import apply_and_run, construct


class FastsafetensorsLoader(Loader):
    name = "peer-fastsafetensors"
    devices = ("cpu",)
    library = ("fastsafetensors", "fastsafetensors")

    def run(self, inputs: Any) -> Any:
        manifest, timeline = self.manifest, self.timeline
        fastsafetensors = self.import_library()
        model = construct(manifest, timeline)
        with timeline.span("read", "SafeTensorsFileLoader(nogds)"):
            # nogds=True with a CPU device: pread through bounce buffers into host memory.
            loader = fastsafetensors.SafeTensorsFileLoader(None, device="cpu", nogds=True)
            try:
                loader.add_filenames({0: [str(self.package_dir / manifest.weights)]})
                buffers = loader.copy_files_to_device()
                try:
                    # Tensors share ownership of their backing buffer: valid after close().
                    state = {name: buffers.get_tensor(name) for name in loader.get_keys()}
                finally:
                    buffers.close()
            finally:
                loader.close()
        return apply_and_run(model, state, manifest, inputs, timeline)
