"""The edge model directory, as `cicada export-edge` writes it and the edge agent reads it: file
names and graph signatures. Shared by the exporter (cloud side, torch) and the runtime (edge
side, ONNX Runtime); needs neither.

    model.onnx          fp32 graph, input "input", output "output", dynamic batch (and sequence)
    model.int8.onnx     the same graph with int8 dynamic-quantized weights (with --int8)
    edge_model.json     where it came from, its signature, tolerances and measured error
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cicada.common.errors import EdgeModelError
from cicada.common.inputs import TensorSpec

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


def tensor_spec(arg: Any, where: Path) -> TensorSpec:
    dtype = ORT_TO_NUMPY.get(arg.type)
    if dtype is None:
        raise EdgeModelError(f"{where}: {arg.name!r} has type {arg.type}, which is not supported")
    # ORT reports a dynamic axis as its symbolic name (str) or None.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, dtype.name, shape)
