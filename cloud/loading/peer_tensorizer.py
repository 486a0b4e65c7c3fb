"""``peer-tensorizer``: CoreWeave tensorizer's `TensorDeserializer` on its own serialized file
(to the CPU, or on a GPU with ``--device cuda`` straight to the device),
``<package>/peers/model.tensors`` (`prepare_tensorizer` writes it once, outside the timed run;
peer loaders: see cloud/loading/registry.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.state_dict import apply_and_run, construct
from cicada.common.errors import CicadaError
from cicada.common.files import replacing_file
from cicada.common.package import Manifest

PEERS_DIR = "peers"
TENSORIZER_FILE = "model.tensors"


def tensorizer_path(package_dir: Path | str) -> Path:
    return Path(package_dir) / PEERS_DIR / TENSORIZER_FILE


def prepare_tensorizer(package_dir: Path | str) -> Path:
    """Serialize the package's weights for tensorizer (once; not part of any timed run).

    Writes ``<package>/peers/model.tensors`` with `TensorSerializer.write_state_dict`, tensors in
    the package's stage order, and a sidecar naming the weights' sha256 so that a re-packed
    model is re-serialized rather than served stale.
    """
    package_dir = Path(package_dir)
    manifest = Manifest.load(package_dir)
    target = tensorizer_path(package_dir)
    source = target.with_name(TENSORIZER_FILE + ".source.json")
    digest = manifest.file(manifest.weights).sha256
    if target.exists() and source.exists():
        try:
            if json.loads(source.read_text()).get("sha256") == digest:
                return target
        except ValueError:
            pass
    try:
        from tensorizer import TensorSerializer
    except ImportError as exc:
        raise TensorizerLoader.missing_library(exc) from None
    from safetensors import safe_open

    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(target) as tmp:
        with safe_open(str(package_dir / manifest.weights), framework="pt", device="cpu") as f:
            state = {t.name: f.get_tensor(t.name) for t in manifest.tensors()}
        serializer = TensorSerializer(str(tmp))
        serializer.write_state_dict(state)
        serializer.close()
    source.write_text(json.dumps({"weights": manifest.weights, "sha256": digest}))
    return target


class TensorizerLoader(Loader):
    name = "peer-tensorizer"
    devices = ("cpu", "cuda")
    library = ("tensorizer", "tensorizer")

    @classmethod
    def prepare(cls, package_dir: Path | str) -> Path | None:
        return prepare_tensorizer(package_dir)

    def run(self, inputs: Any) -> Any:
        manifest, timeline = self.manifest, self.timeline
        path = tensorizer_path(self.package_dir)
        if not path.exists():
            raise CicadaError(
                f"{path} does not exist: tensorizer reads its own format; create it with "
                f"cicada.cloud.loading.peer_tensorizer.prepare_tensorizer("
                f"{str(self.package_dir)!r}) (the benchmark does)"
            )
        tensorizer = self.import_library()
        model = construct(manifest, timeline, self.device)
        with timeline.span("read", "TensorDeserializer"):
            # lazy_load=False: every tensor is read up front, with tensorizer's own reader
            # threads; on a GPU its own GPU mode (pinned staging, device-side allocation).
            deserializer = tensorizer.TensorDeserializer(str(path), device=self.device,
                                                         lazy_load=False)  # fmt: skip
            state = {str(name): deserializer[name] for name in deserializer}
        expected = {t.name for t in manifest.tensors()}
        if set(state) != expected:
            raise CicadaError(f"{path} does not hold the package's tensors: delete it and re-run "
                              f"prepare_tensorizer")  # fmt: skip
        output = apply_and_run(model, state, manifest, inputs, timeline)
        deserializer.close()
        return output
