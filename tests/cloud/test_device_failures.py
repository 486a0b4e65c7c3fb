"""A device failure (out of GPU memory, a CUDA error) is the worker's, not the caller's: the
request ends UNAVAILABLE and the worker exits EXIT_DEVICE_FAILED for replacement, its CUDA
context possibly poisoned. And the warm pool never forks once CUDA is initialised.

On CPU: `torch.cuda.OutOfMemoryError` exists in CPU builds, so the mapping is shown by raising
it; the worker runs in process on the tiny package, its network runtime stubbed out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cicada.cloud import warm_pool
from cicada.cloud.service import (
    EXIT_DEVICE_FAILED,
    EXIT_LOAD_FAILED,
    CloudWorker,
    CloudWorkerConfig,
)
from cicada.common.errors import DeviceError, LaunchError
from cicada.common.protocol import Dispatch, Status
from cicada.common.signals import StopRequest
from cicada.common.worker import Stream


def _worker(package: Path, monkeypatch: pytest.MonkeyPatch) -> CloudWorker:
    worker = CloudWorker(CloudWorkerConfig(package, "gpt2"))
    for name, stub in (("start", lambda: None), ("drain", lambda: None),
                       ("join", lambda _t=None: True), ("notify", lambda: None)):  # fmt: skip
        monkeypatch.setattr(worker.runtime, name, stub)
    return worker


def _request(worker: CloudWorker, tiny_package: dict[str, Path]) -> Status:
    x = np.load(tiny_package["input"])
    dispatch = Dispatch(id="d1", model="gpt2", inputs=[x])
    return worker._run(dispatch, None, Stream(dispatch.id, worker.runtime)).status


@pytest.mark.parametrize(
    "exc",
    [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
     RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")],
    ids=["oom", "cuda-error"],
)  # fmt: skip
def test_a_device_failure_while_running_is_unavailable_and_the_worker_exits(
    tiny_package: dict[str, Path], monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    worker = _worker(tiny_package["package"], monkeypatch)
    worker._build()

    def fails(*_: object, **__: object) -> None:
        raise exc

    monkeypatch.setattr(worker.cold, "forward", fails)
    assert _request(worker, tiny_package) is Status.UNAVAILABLE  # not the caller's BAD_REQUEST
    assert isinstance(worker.failed, DeviceError)
    assert _request(worker, tiny_package) is Status.UNAVAILABLE  # takes no more work
    assert worker._serve(StopRequest()) == EXIT_DEVICE_FAILED


def test_a_model_error_that_is_not_the_device_stays_the_callers(
    tiny_package: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(tiny_package["package"], monkeypatch)
    worker._build()

    def refuses(*_: object, **__: object) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(worker.cold, "forward", refuses)
    assert _request(worker, tiny_package) is Status.BAD_REQUEST
    assert worker.failed is None


@pytest.mark.parametrize("during", ["build", "load"])
def test_out_of_memory_while_loading_exits_for_replacement(
    tiny_package: dict[str, Path], monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    worker = _worker(tiny_package["package"], monkeypatch)
    if during == "build":  # construction on the device ran out of memory

        def build() -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(worker.cold, "build", build)
    else:  # the loader thread reported it: the pipeline's failure path (test_cuda_source.py)
        worker.cold._fail(DeviceError("simulated: out of memory while copying stage 1"))
    assert worker._serve(StopRequest()) == EXIT_DEVICE_FAILED
    assert isinstance(worker.failed, DeviceError)
    assert EXIT_DEVICE_FAILED != EXIT_LOAD_FAILED


def test_the_warm_pool_refuses_to_fork_after_cuda_initialisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA cannot initialise on this CPU machine, so `is_initialized` is patched: this tests
    # the guard only, not what CUDA does in a forked child.
    warm_pool.check_fork_safe()  # nothing initialised: forking is allowed
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(LaunchError, match="CUDA was initialised in the pool process"):
        warm_pool.check_fork_safe()
    spec = {
        "name": "w1",
        "package": "/nonexistent",
        "model": "m",
        "coordinator": "tcp://127.0.0.1:1",
    }
    with pytest.raises(LaunchError, match="CUDA was initialised"):
        warm_pool._answer({"op": "launch", "spec": spec}, {}, [], None)
