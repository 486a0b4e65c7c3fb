"""What a cloud worker reports while it starts (docs/PROTOCOL.md section 4): its phase, the
weights read apart from the stages resident, an ETA that covers the import; and how its
compute estimate treats the first forward once loaded. In process, on the tiny package."""

from __future__ import annotations

import time
from pathlib import Path

from cicada.cloud.service import ASSUMED_CONSTRUCT_S, CloudWorker, CloudWorkerConfig
from cicada.common.protocol import PHASES, Dispatch, Result, Role, Status, WorkerState
from cicada.common.worker import RuntimeConfig, Stream, WorkerRuntime


def test_phases_in_order_with_the_read_ahead_of_the_stages_resident(
    tiny_package: dict[str, Path],
) -> None:
    worker = CloudWorker(CloudWorkerConfig(tiny_package["package"], "gpt2"))
    total = len(worker.cold.manifest.stages)
    deadline = time.monotonic() + 60
    while worker.cold.read_stages < total and time.monotonic() < deadline:
        time.sleep(0.01)
    importing = worker.status()
    # Everything read and verified, nothing resident: no stage can be applied before the
    # model is built, which waits for the import.
    assert (importing.phase, importing.state) == ("importing", WorkerState.COLD)
    assert (importing.read_stages, importing.resident_stages) == (total, 0)
    assert importing.read_bytes == importing.total_bytes == worker.cold.manifest.total_bytes
    assert importing.eta_s is not None and importing.eta_s >= ASSUMED_CONSTRUCT_S
    assert importing.phase_s is not None and importing.phase_s >= 0

    worker._enter("constructing")
    constructing = worker.status()
    assert constructing.phase == "constructing" and constructing.state is WorkerState.COLD
    assert constructing.eta_s is not None and constructing.eta_s > 0

    worker.cold.build()
    worker.built.set()
    worker._enter("loading")
    ready = worker.status()
    assert (ready.phase, ready.state) == ("ready", WorkerState.READY)
    assert ready.resident_stages == ready.total_stages == total and ready.eta_s == 0.0
    seen = [s.phase for s in (importing, constructing, ready)]
    assert seen == sorted(seen, key=PHASES.index)


def test_the_warm_up_forward_stands_in_for_the_estimate_until_the_next_replaces_it() -> None:
    """A worker's first forward once loaded (4 s where the next took 1.5 s) is its compute
    estimate only until a steady forward replaces it; it is never averaged in."""
    answers = iter(
        [
            {"compute_s": 2.0, "during_load": 1.0},  # waited for weights: says nothing
            {"compute_s": 4.0, "warmup": 1.0},
            {"compute_s": 1.5},
            {"compute_s": 1.0},
        ]
    )

    def handler(dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        return Result(id=dispatch.id, status=Status.OK, timings=next(answers))

    runtime = WorkerRuntime(RuntimeConfig("tcp://127.0.0.1:1", Role.CLOUD, "w", ["m"]), handler)
    estimates = []
    for i in range(4):
        dispatch = Dispatch(id=f"d{i}", model="m")
        runtime._execute(dispatch, None, Stream(dispatch.id, runtime))
        estimates.append(runtime.compute_estimate)
    assert estimates == [None, 4.0, 1.5, 0.8 * 1.5 + 0.2 * 1.0]
