"""``peer-fastsafetensors``: fastsafetensors' `SafeTensorsFileLoader` with ``nogds=True``: pread
into host buffers, no GPUDirect Storage; on a GPU (``--device cuda``) its own GPU mode, the
file copied through pinned bounce buffers into one device buffer that the tensors are views of
(peer loaders: see cloud/loading/registry.py)."""

from __future__ import annotations

from typing import Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import apply_and_run, construct


class FastsafetensorsLoader(Loader):
    name = "peer-fastsafetensors"
    devices = ("cpu", "cuda")
    library = ("fastsafetensors", "fastsafetensors")

    def run(self, inputs: Any) -> Any:
        manifest, timeline = self.manifest, self.timeline
        fastsafetensors = self.import_library()
        model = construct(manifest, timeline, self.device)
        with timeline.span("read", "SafeTensorsFileLoader(nogds)"):
            # nogds=True: pread through bounce buffers into memory of `device` (CPU or GPU).
            loader = fastsafetensors.SafeTensorsFileLoader(None, device=self.device, nogds=True)
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
