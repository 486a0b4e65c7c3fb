"""The edge model directory, as `cicada export-edge` writes it and the edge agent reads it: file
names and graph signatures. Shared by the exporter (cloud side, torch) and the runtime (edge
side, ONNX Runtime); needs neither.

    model.onnx          fp32 graph, input "input", output "output", dynamic batch (and sequence)
    model.int8.onnx     the same graph with int8 dynamic-quantized weights (with --int8)
    edge_model.json     where it came from, its signature, tolerances and measured error
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cicada.common.errors import CicadaError

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
INFO_NAME = "edge_model.json"
# A decoder model's cached step graph (docs/PROTOCOL.md section 12): ids (B, T) and past
# (layers, 2, B, heads, P, head_size) -> logits (B, T, V) and present (..., P + T, ...).
DECODER_NAME = "decoder.onnx"
DECODER_INT8_NAME = "decoder.int8.onnx"

# ONNX Runtime's type strings -> numpy dtypes (the ones an edge model is likely to take).
ORT_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


class EdgeModelError(CicadaError):
    """An edge model cannot be loaded, or was given inputs it does not take."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` has None where the axis is dynamic (batch, sequence)."""

    name: str
    dtype: str  # numpy name, e.g. "int64", "float32"
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict[str, Any]:
        """The edge_model.json form: -1 marks a dynamic axis."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [-1 if d is None else d for d in self.shape],
        }


def tensor_spec(arg: Any, where: Path) -> TensorSpec:
    dtype = ORT_TO_NUMPY.get(arg.type)
    if dtype is None:
        raise EdgeModelError(f"{where}: {arg.name!r} has type {arg.type}, which is not supported")
    # ORT reports a dynamic axis as its symbolic name (str) or None.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, dtype.name, shape)
