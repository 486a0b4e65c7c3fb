"""The CUDA stage source's correctness, shown on CPU with a simulated device
(cloud/loading/simulated.py): copies are enqueued and complete later, in stream order, as on a
GPU. What depends on CUDA itself (real streams, pinned memory, kernels) is the `gpu` test in
tests/cloud/test_strategies.py and benchmarks/gpu_check.py.

No test here waits on time: the simulated device completes copies when told, and every wait
is bounded (a regression ends in an error, never a hang)."""

from __future__ import annotations

import gc
import importlib
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cicada.cloud.loading.cuda import CudaStageSource
from cicada.cloud.loading.simulated import SimulatedCuda
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.common.errors import (
    CicadaError,
    DeviceError,
    LoadStalledError,
    PackageIntegrityError,
)
from cicada.common.package import Manifest
from tests.cloud import layout_models
from tests.cloud.test_corrupt_packages import flip_byte_in_stage

BOUND_S = 30.0  # a regression that would hang fails with LoadStalledError after this


def _gpt2(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    module = importlib.import_module("cicada.cloud.models.gpt2")
    config = module.tiny_config()
    pack("cicada.cloud.models.gpt2:build", tmp_path / "pkg", config=config)
    x = module.example_input(config)
    with torch.inference_mode():
        expected = module.build(**config)(x)
    return tmp_path / "pkg", x, expected


def _cold(package: Path, sim: SimulatedCuda, **kwargs: Any) -> ColdStart:
    source = CudaStageSource.using(lambda _device: sim)
    return ColdStart(package, source=source, stall_timeout=BOUND_S, **kwargs)


def test_simulated_load_is_bit_identical_and_compute_waits_on_each_stage_event(
    tmp_path: Path,
) -> None:
    package, x, expected = _gpt2(tmp_path)
    sim = SimulatedCuda()
    cold = _cold(package, sim)
    assert torch.equal(cold.forward(x), expected)
    source = cold.source
    assert isinstance(source, CudaStageSource)
    # Compute waited on exactly the stages' own events (the ones recorded after their copies).
    stage_events = {id(e) for e in source.stage_done}
    assert sim.waited and {id(e) for e in sim.waited} == stage_events


def test_a_stage_is_resident_only_once_its_copies_completed(tmp_path: Path) -> None:
    package, x, expected = _gpt2(tmp_path)
    sim = SimulatedCuda(hold=True)  # copies are queued, and complete only on release()
    cold = _cold(package, sim)
    cold.build()
    stages = cold.manifest.stages
    source = cold.source
    assert isinstance(source, CudaStageSource)
    queued = sum(source.piece_copies[: len(source.ring.buffers)])
    sim.wait_queued(queued)  # the loader enqueued every copy the ring allows
    assert not any(cold.is_resident(s.index) for s in stages)
    assert cold.read_stages == 0  # READY cannot be due: nothing announced
    assert not [s for s in cold.timeline.spans if s.lane == "read"]
    released_at = cold.timeline.now()
    sim.release()
    cold.wait_all(timeout=BOUND_S)
    reads = [s for s in cold.timeline.spans if s.lane == "read"]
    assert len(reads) == len(stages)
    assert all(span.end >= released_at for span in reads)  # stamped at completion
    assert torch.equal(cold.forward(x), expected)


class _FailsAtAttach(SimulatedCuda):
    def pin(self, host: torch.Tensor) -> None:
        raise torch.cuda.OutOfMemoryError("simulated: cannot pin the ring")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: SimulatedCuda(fail_copy=2), PackageIntegrityError),  # a size mismatch
        (
            lambda: SimulatedCuda(fail_sync=RuntimeError("CUDA error: an illegal memory access")),
            DeviceError,
        ),
        (lambda: SimulatedCuda(fail_sync=torch.cuda.OutOfMemoryError("simulated")), DeviceError),
        (lambda: SimulatedCuda(fail_sync=KeyError("anything at all")), PackageIntegrityError),
    ],
    ids=["copy-raises", "cuda-error-at-sync", "oom-at-sync", "any-type"],
)
def test_any_loader_exception_fails_the_forward_instead_of_hanging(
    tmp_path: Path, make: Callable[[], SimulatedCuda], expected: type[CicadaError]
) -> None:
    package, x, _ = _gpt2(tmp_path)
    cold = _cold(package, make())
    heard: list[CicadaError] = []
    cold.on_error(heard.append)
    with pytest.raises(CicadaError) as caught:
        cold.forward(x)
    assert not isinstance(caught.value, LoadStalledError)  # woken by the error, not the bound
    assert isinstance(caught.value, expected) and heard == [caught.value]
    # The failed load's threads end by themselves (before a process exits, it waits for
    # them: one inside a torch op at interpreter exit aborts the process).
    assert cold.join_loader(BOUND_S)
    assert not [t.name for t in cold.source._threads if t.is_alive()]


def test_a_failure_while_attaching_reaches_every_listener(tmp_path: Path) -> None:
    package, _, _ = _gpt2(tmp_path)
    cold = _cold(package, _FailsAtAttach())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cold.build()
    assert isinstance(cold.error, DeviceError)
    with pytest.raises(DeviceError):
        next(cold.residency(timeout=BOUND_S))


def test_a_corrupt_stage_fails_the_load(tmp_path: Path) -> None:
    package, x, _ = _gpt2(tmp_path)
    flip_byte_in_stage(package, Manifest.load(package).stages[1].name)
    with pytest.raises(PackageIntegrityError, match="checksum mismatch"):
        _cold(package, SimulatedCuda()).forward(x)


def test_a_non_contiguous_parameter_receives_its_bytes(tmp_path: Path) -> None:
    """Its bytes once went into a temporary (`reshape(-1)` copies) and it stayed garbage."""
    factory = "tests.cloud.layout_models:build_strided"
    pack(factory, tmp_path / "pkg")
    cold = _cold(tmp_path / "pkg", SimulatedCuda(), trust_package_code=True)
    cold.build()
    model = cold.model
    assert isinstance(model, layout_models.Strided)
    assert not model.weight.is_contiguous()  # the constructed layout is kept
    x = layout_models.example_input()
    with torch.inference_mode():
        assert torch.equal(cold.forward(x), layout_models.build_strided()(x))


def test_an_alias_the_constructor_does_not_tie_is_tied(tmp_path: Path) -> None:
    """The packed model ties b.weight to a.weight; the factory rebuilds them apart. The alias
    once stayed uninitialised on the GPU path."""
    factory = "tests.cloud.layout_models:build_pair"
    tied = layout_models.build_pair(tie=True)
    manifest = pack(factory, tmp_path / "pkg", config={"tie": False}, model=tied)
    assert manifest.aliases == {"b.weight": "a.weight"}
    cold = _cold(tmp_path / "pkg", SimulatedCuda(), trust_package_code=True)
    x = layout_models.example_input()
    with torch.inference_mode():
        assert torch.equal(cold.forward(x), tied(x))
    model = cold.model
    assert isinstance(model, layout_models.Pair)
    assert model.b.weight is model.a.weight  # one tensor, as on the CPU path


def test_the_pinned_ring_is_released_after_the_load(tmp_path: Path) -> None:
    package, x, _ = _gpt2(tmp_path)
    sim = SimulatedCuda(hold=True)  # the load cannot end (and release the ring) before we look
    cold = _cold(package, sim)
    cold.build()
    source = cold.source
    assert isinstance(source, CudaStageSource)
    rings = [weakref.ref(buf) for buf in sim.pinned_buffers]
    assert len(rings) == len(source.ring.buffers) == source.readers + 2  # the sizing rule
    sim.release()
    cold.forward(x)
    assert source.loaded.wait(BOUND_S)
    gc.collect()
    assert source.host == [] and source.ring.buffers == []  # unmapped
    assert sim.pinned_buffers == [] and sim.unpinned == len(rings)  # unregistered, each
    assert all(ref() is None for ref in rings)  # nothing holds the pinned memory any more
