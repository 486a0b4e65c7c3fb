"""When a cloud worker reorders its weights for oneDNN's row-invariant kernel (cloud/few_rows.py):
the copy is the weights' size again, so only once every stage is resident, only once a
generation has come (a worker that only runs forwards never reads it), and only where
row_linear takes that kernel. In process on the tiny package, the network runtime stubbed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

from cicada.cloud import few_rows
from cicada.cloud.few_rows import REORDERED
from cicada.cloud.service import CloudWorker, CloudWorkerConfig
from cicada.common.protocol import Dispatch, Status
from cicada.common.worker import Stream

pytestmark = pytest.mark.skipif(not few_rows.onednn_available(), reason="no oneDNN in this torch")


@pytest.fixture(autouse=True)
def _restore_row_invariance() -> Iterator[None]:
    yield
    few_rows.set_row_invariance("auto")  # a worker's _build sets it for the whole process


def _worker(package: Path, monkeypatch: pytest.MonkeyPatch, rows: str) -> CloudWorker:
    worker = CloudWorker(CloudWorkerConfig(package, "gpt2", row_invariant=rows))
    for name, stub in (("start", lambda: None), ("drain", lambda: None),
                       ("join", lambda _t=None: True), ("notify", lambda: None)):  # fmt: skip
        monkeypatch.setattr(worker.runtime, name, stub)
    worker._build()
    worker.cold.wait_all(timeout=60)
    return worker


def _run(worker: CloudWorker, x: np.ndarray, **options: object) -> Status:
    dispatch = Dispatch(id=f"d{len(options)}", model="gpt2", inputs=[x], options=options)
    return worker._run(dispatch, None, Stream(dispatch.id, worker.runtime)).status


def _reordering(worker: CloudWorker) -> object:
    return worker.cold.model.__dict__.get("_cicada_reordering")


def _linears(worker: CloudWorker) -> list[nn.Linear]:
    return [m for m in worker.cold.model.modules() if isinstance(m, nn.Linear)]


def test_forwards_alone_never_reorder_and_the_first_generation_does(
    tiny_package: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(tiny_package["package"], monkeypatch, "always")
    x = np.load(tiny_package["input"])
    for _ in range(2):
        assert _run(worker, x) is Status.OK
    assert _reordering(worker) is None
    assert not any(REORDERED in layer.__dict__ for layer in _linears(worker))

    assert _run(worker, x[:, :4], max_new_tokens=3) is Status.OK
    thread = _reordering(worker)
    assert thread is not None
    thread.join(timeout=60)  # type: ignore[attr-defined]
    # Every copy is of the weights as loaded (a copy made before the load would carry another
    # tensor's pointer, and row_linear would never read it).
    copies = [
        layer.__dict__[REORDERED] for layer in _linears(worker) if REORDERED in layer.__dict__
    ]
    assert copies
    live = {(layer.weight.data_ptr(), few_rows.weight_version(layer.weight))
            for layer in _linears(worker)}  # fmt: skip
    assert all(key in live for key, _ in copies)
    # A second generation starts no second reordering.
    assert _run(worker, x[:, :4], max_new_tokens=2) is Status.OK
    assert _reordering(worker) is thread


def test_no_copy_where_row_linear_does_not_take_onednn(
    tiny_package: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(tiny_package["package"], monkeypatch, "never")
    x = np.load(tiny_package["input"])
    assert _run(worker, x[:, :4], max_new_tokens=3) is Status.OK
    assert _reordering(worker) is None
    assert not any(REORDERED in layer.__dict__ for layer in _linears(worker))
