"""Peer loaders, in the same harness as the baselines and on the same package.

Each peer builds the model exactly as the ``meta`` baseline does (MiniLoader: init skipped, on
CPU), loads the same weights with the peer library in its CPU mode into a state dict (lane
"read"), hands it to ``load_state_dict(strict=True, assign=True)`` (lane "apply") and runs one
forward under ``torch.inference_mode`` (lane "compute"). Importing the peer library is timed on
the "import" lane. The libraries are optional (the ``bench`` extra) and imported lazily.

* ``peer-tensorizer``       CoreWeave tensorizer's `TensorDeserializer` on its own serialized
                            file, ``<package>/peers/model.tensors`` (`prepare_tensorizer` writes
                            it once, outside the timed run).
* ``peer-runai``            Run:ai model streamer's `SafetensorsStreamer`, CPU destination,
                            streaming the package's ``weights.safetensors``.
* ``peer-fastsafetensors``  fastsafetensors' `SafeTensorsFileLoader` with ``nogds=True`` and
                            device cpu (pread into host buffers, no GPUDirect Storage).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cicada.cloud.loading.baselines import Baseline, _forward, _with_aliases
from cicada.cloud.miniloader import build_model
from cicada.cloud.timeline import Timeline
from cicada.common.errors import CicadaError
from cicada.common.package import Manifest

PEERS_DIR = "peers"
TENSORIZER_FILE = "model.tensors"
_INSTALL_HINT = "install the benchmark extra: pip install -e '.[bench]'"


def _missing(library: str, exc: ImportError) -> CicadaError:
    return CicadaError(f"peer loader needs {library}, which cannot be imported ({exc}); "
                       f"{_INSTALL_HINT}")  # fmt: skip


def _check_device(strategy: str, device: str) -> None:
    if device != "cpu":
        raise CicadaError(
            f"{strategy} runs the peer library in its CPU mode only; use --device cpu"
        )


def _construct(manifest: Manifest, timeline: Timeline) -> torch.nn.Module:
    arch = manifest.architecture
    with timeline.span("construct", "construct"):
        return build_model(arch.factory, arch.config, init=False)


def _apply_and_run(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    manifest: Manifest,
    inputs: Any,
    timeline: Timeline,
) -> Any:
    with timeline.span("apply", "load_state_dict(assign)"):
        model.load_state_dict(_with_aliases(state, manifest), strict=True, assign=True)
    return _forward(model, inputs, timeline)


# -- tensorizer -------------------------------------------------------------------------------


def tensorizer_path(package_dir: Path) -> Path:
    return Path(package_dir) / PEERS_DIR / TENSORIZER_FILE


def prepare_tensorizer(package_dir: Path) -> Path:
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
        raise _missing("tensorizer", exc) from None
    from safetensors import safe_open

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{TENSORIZER_FILE}.tmp-{os.getpid()}")
    try:
        with safe_open(str(package_dir / manifest.weights), framework="pt", device="cpu") as f:
            state = {t.name: f.get_tensor(t.name) for t in manifest.tensors()}
        serializer = TensorSerializer(str(tmp))
        serializer.write_state_dict(state)
        serializer.close()
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    source.write_text(json.dumps({"weights": manifest.weights, "sha256": digest}))
    return target


def run_tensorizer(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    _check_device("peer-tensorizer", device)
    path = tensorizer_path(package_dir)
    if not path.exists():
        raise CicadaError(
            f"{path} does not exist: tensorizer reads its own format; create it with "
            f"cicada.cloud.loading.peers.prepare_tensorizer({str(package_dir)!r}) "
            "(the benchmark does)"
        )
    with timeline.span("import", "tensorizer"):
        try:
            from tensorizer import TensorDeserializer
        except ImportError as exc:
            raise _missing("tensorizer", exc) from None
    model = _construct(manifest, timeline)
    with timeline.span("read", "TensorDeserializer"):
        # lazy_load=False: every tensor is read up front, with tensorizer's own reader threads.
        deserializer = TensorDeserializer(str(path), device="cpu", lazy_load=False)
        state = {str(name): deserializer[name] for name in deserializer}
    expected = {t.name for t in manifest.tensors()}
    if set(state) != expected:
        raise CicadaError(f"{path} does not hold the package's tensors: delete it and re-run "
                          f"prepare_tensorizer")  # fmt: skip
    output = _apply_and_run(model, state, manifest, inputs, timeline)
    deserializer.close()
    return output


# -- Run:ai model streamer --------------------------------------------------------------------


def run_runai(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    _check_device("peer-runai", device)
    with timeline.span("import", "runai_model_streamer"):
        try:
            from runai_model_streamer import SafetensorsStreamer
        except ImportError as exc:
            raise _missing("runai-model-streamer", exc) from None
    model = _construct(manifest, timeline)
    state: dict[str, torch.Tensor] = {}
    with timeline.span("read", "SafetensorsStreamer"), SafetensorsStreamer() as streamer:
        # owned=True (the default): each yielded tensor is the caller's to keep.
        streamer.stream_file(str(package_dir / manifest.weights), device="cpu")
        for name, tensor in streamer.get_tensors():
            state[name] = tensor
    return _apply_and_run(model, state, manifest, inputs, timeline)


# -- fastsafetensors --------------------------------------------------------------------------


def run_fastsafetensors(
    package_dir: Path, manifest: Manifest, inputs: Any, device: str, timeline: Timeline
) -> Any:
    _check_device("peer-fastsafetensors", device)
    with timeline.span("import", "fastsafetensors"):
        try:
            from fastsafetensors import SafeTensorsFileLoader
        except ImportError as exc:
            raise _missing("fastsafetensors", exc) from None
    model = _construct(manifest, timeline)
    with timeline.span("read", "SafeTensorsFileLoader(nogds)"):
        # nogds=True with a CPU device: pread through bounce buffers into host memory.
        loader = SafeTensorsFileLoader(None, device="cpu", nogds=True)
        try:
            loader.add_filenames({0: [str(package_dir / manifest.weights)]})
            buffers = loader.copy_files_to_device()
            try:
                # Tensors share ownership of their backing buffer: valid after close().
                state = {name: buffers.get_tensor(name) for name in loader.get_keys()}
            finally:
                buffers.close()
        finally:
            loader.close()
    return _apply_and_run(model, state, manifest, inputs, timeline)


PEERS: dict[str, Baseline] = {
    "peer-tensorizer": run_tensorizer,
    "peer-runai": run_runai,
    "peer-fastsafetensors": run_fastsafetensors,
}
