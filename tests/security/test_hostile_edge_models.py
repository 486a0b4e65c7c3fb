"""Hostile edge models: an ONNX file whose weights are "external data" naming a file outside
its directory (`../`, an absolute path, a symlink out), as a dense initializer, a sparse one,
or a Constant node's sparse value. Loaded, any of them would read that file into the model
and hand it to every client in its outputs. The edge agent must refuse each before serving:
`EdgeModel.load` raises EdgeModelError, and `cicada edge` exits with one error line.

onnxruntime does the refusing (its external-data path check, complete for all three forms
from 1.27; 1.23 read every one of them, 1.24-1.26 the sparse ones): pyproject.toml requires
onnxruntime>=1.27, and this test keeps whatever is installed honest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cicada.common.edge_model import INFO_NAME, ONNX_NAME
from cicada.common.errors import EdgeModelError
from cicada.edge.onnx_model import EdgeModel

onnx = pytest.importorskip("onnx")
helper, TensorProto = onnx.helper, onnx.TensorProto

SECRET = b"SECRET-SECRET-16"  # 16 bytes: four float32 weights
FORMS = ["dense", "sparse-initializer", "sparse-constant"]
ESCAPES = ["dotdot", "absolute", "symlink"]


def external(name: str, location: str) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def hostile_model(root: Path, form: str, escape: str) -> Path:
    """An edge model directory under `root` whose one weight is `root/secret.bin`."""
    secret = root / "secret.bin"
    secret.write_bytes(SECRET)
    model_dir = root / "edge"
    model_dir.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}
    if escape == "symlink":
        os.symlink(secret, model_dir / "weights.bin")
    weight = external("c", location[escape])
    index = helper.make_tensor("i", TensorProto.INT64, [4], [0, 1, 2, 3])
    add = helper.make_node("Add", ["x", "c"], ["y"])
    nodes, initializers, sparse = [add], [], []
    if form == "dense":
        initializers.append(weight)
    elif form == "sparse-initializer":
        sparse.append(helper.make_sparse_tensor(weight, index, [4]))
    else:
        value = helper.make_sparse_tensor(external("v", location[escape]), index, [4])
        nodes.insert(0, helper.make_node("Constant", [], ["c"], sparse_value=value))
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializers, sparse_initializer=sparse,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (model_dir / ONNX_NAME).write_bytes(model.SerializeToString())
    (model_dir / INFO_NAME).write_text("{}")
    return model_dir


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("form", FORMS)
def test_an_edge_model_reading_outside_its_directory_is_refused(
    tmp_path: Path, form: str, escape: str
) -> None:
    model_dir = hostile_model(tmp_path, form, escape)
    try:
        model = EdgeModel.load(model_dir)
    except EdgeModelError as exc:
        assert "cannot be loaded by ONNX Runtime" in str(exc)
        return
    leaked = model.run([np.zeros(4, np.float32)])[0].tobytes()  # what a client would get
    pytest.fail(f"loaded, and its outputs hold {leaked!r} (the secret: {SECRET in leaked})")


def test_cicada_edge_refuses_it_before_serving(tmp_path: Path) -> None:
    model_dir = hostile_model(tmp_path, "dense", "dotdot")
    proc = subprocess.run(
        [sys.executable, "-m", "cicada", "edge", "--model", "m", "--onnx", str(model_dir),
         "--coordinator", "tcp://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot be loaded by ONNX Runtime" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
