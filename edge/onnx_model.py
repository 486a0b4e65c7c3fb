"""Run an exported edge model with ONNX Runtime: what the edge agent loads. Torch-free.

An edge model directory is what `cicada export-edge` writes (file names and signatures in
`cicada.common.edge_model`, shared with the exporter).

`EdgeModel.load(dir)` picks the int8 file when the export made one, else the fp32 one;
`EdgeModel.load(dir / "model.onnx")` picks a file explicitly. Inputs are checked against the
graph's own metadata before ONNX Runtime sees them, so a wrong dtype or rank comes back as an
`EdgeModelError` that says what was expected, not as an ONNX Runtime stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cicada.common.edge_model import (
    INFO_NAME,
    INT8_NAME,
    ONNX_NAME,
    EdgeModelError,
    tensor_spec,
)
from cicada.common.generation import limits_of
from cicada.common.inputs import InputError, InputLimits
from cicada.edge.drafter import Drafter


def read_info(path: Path) -> dict[str, Any]:
    """Parse edge_model.json, with errors that name the file."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeModelError(
            f"{path} is missing: an edge model directory is written by `cicada export-edge`"
        ) from None
    except (OSError, ValueError) as exc:
        raise EdgeModelError(
            f"{path} is not readable JSON ({exc}): re-run `cicada export-edge`"
        ) from exc
    if not isinstance(doc, dict):
        raise EdgeModelError(f"{path} must hold a JSON object")
    return doc


class EdgeModel:
    """An ONNX Runtime session over one edge model file, plus its edge_model.json."""

    def __init__(
        self,
        session: ort.InferenceSession,
        path: Path,
        info: dict[str, Any],
        variant: str,
        decoder: ort.InferenceSession | None = None,
    ) -> None:
        self._session = session
        self._path = path
        self._info = info
        self._variant = variant
        self._decoder = decoder
        self.inputs = [tensor_spec(a, path) for a in session.get_inputs()]
        self.outputs = [tensor_spec(a, path) for a in session.get_outputs()]
        # What the graph takes, and a token model's context and vocabulary (edge_config).
        self.limits = InputLimits(tuple(self.inputs), *limits_of(info.get("edge_config") or {}))

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        int8: bool | None = None,
        intra_op_num_threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> EdgeModel:
        """Open an edge model: a directory (int8 file if exported, else fp32; `int8` forces
        one) or a .onnx file with edge_model.json beside it.

        `intra_op_num_threads` defaults to 1: an edge device usually serves other work too,
        and one thread gives the steadiest latency for small models.
        """
        path = Path(path)
        if path.is_dir():
            info = read_info(path / INFO_NAME)
            use_int8 = bool(info.get("int8")) if int8 is None else int8
            onnx_path = path / (INT8_NAME if use_int8 else ONNX_NAME)
        else:
            info = read_info(path.parent / INFO_NAME)
            onnx_path = path
        if not onnx_path.is_file():
            hint = ""
            if onnx_path.name == INT8_NAME:
                hint = ": export with --int8 to get one"
            elif info.get("int8"):
                hint = ": the export is int8 only (export-edge --keep-fp32 keeps fp32)"
            raise EdgeModelError(f"{onnx_path} is missing{hint}")
        if intra_op_num_threads < 1:
            raise EdgeModelError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = _session(onnx_path, options, providers)
        files = info.get("files")
        listed: dict[str, Any] = files if isinstance(files, dict) else {}
        entry = listed.get("decoder_int8" if onnx_path.name == INT8_NAME else "decoder_fp32")
        decoder = None
        if isinstance(entry, dict) and (onnx_path.parent / str(entry.get("path"))).is_file():
            decoder = _session(onnx_path.parent / str(entry["path"]), options, providers)
        return cls(session, onnx_path, info, _variant_of(info, onnx_path.name), decoder)

    def new_decoder(self) -> CachedDecoder | None:
        """A greedy decoder over the exported cached step graph (one per generation; they
        share the session), or None if this model has none (then recompute the sequence)."""
        return None if self._decoder is None else CachedDecoder(self._decoder)

    def new_drafter(self) -> Drafter | None:
        """Greedy drafts for speculative decoding over the cached step graph (edge/drafter.py;
        one per generation), or None if this model has none."""
        if self._decoder is None:
            return None
        return Drafter(self._decoder, self.limits.vocab)

    @property
    def variant(self) -> str:
        """E.g. "gpt2-edge-L6-int8": which model answered, for replies and metrics."""
        return self._variant

    @property
    def info(self) -> dict[str, Any]:
        """The parsed edge_model.json."""
        return self._info

    @property
    def path(self) -> Path:
        return self._path

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One forward. Inputs in graph order; dtype, rank and fixed axes must match exactly
        (no silent casting: an int32 token array is an error, not a copy), and token ids must
        fit the model's context and vocabulary (`cicada.common.inputs`)."""
        try:
            self.limits.check(inputs)
        except InputError as exc:
            raise EdgeModelError(str(exc)) from exc
        feeds = {spec.name: array for spec, array in zip(self.inputs, inputs, strict=True)}
        try:
            outputs = self._session.run(None, feeds)
        except Exception as exc:  # ORT's own exception types
            raise EdgeModelError(
                f"{self._path}: ONNX Runtime failed ({type(exc).__name__}: {exc})"
            ) from exc
        return [np.asarray(o) for o in outputs]


def _session(
    path: Path, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ORT raises its own types (Fail, InvalidProtobuf, ...)
        raise EdgeModelError(
            f"{path} cannot be loaded by ONNX Runtime ({type(exc).__name__}: {exc}); "
            "the file is corrupt or not an ONNX model: re-run `cicada export-edge`"
        ) from exc


class CachedDecoder:
    """Greedy steps on a decoder's cached step graph (cicada.common.generation.Decoder): the prompt
    once, then one token at a time with the keys and values so far."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        shape = session.get_inputs()[1].shape  # (layers, 2, batch, heads, past, head_size)
        self._empty = np.zeros((shape[0], 2, 1, shape[3], 0, shape[5]), dtype=np.float32)
        self._past = self._empty

    def _run(self, ids: np.ndarray) -> int:
        try:
            logits, self._past = self._session.run(None, {"ids": ids, "past": self._past})
        except Exception as exc:  # ORT's own exception types
            raise EdgeModelError(
                f"the cached decoder failed ({type(exc).__name__}: {exc})"
            ) from exc
        return int(np.argmax(logits[0, -1]))

    def start(self, prompt: np.ndarray) -> int:
        self._past = self._empty
        return self._run(np.asarray(prompt, dtype=np.int64).reshape(1, -1))

    def advance(self, token: int) -> int:
        return self._run(np.asarray([[token]], dtype=np.int64))


def _variant_of(info: dict[str, Any], file_name: str) -> str:
    files = info.get("files")
    if isinstance(files, dict):
        for entry in files.values():
            if isinstance(entry, dict) and entry.get("path") == file_name:
                return str(entry.get("variant", info.get("variant", "")))
    return str(info.get("variant", file_name))
