"""One cold start in this process: what `cicada run` does, timed lane by lane.

Import order matters and is the point: every strategy (cloud/loading/registry.py) is opened
*before* `import torch`; for ``cicada`` that starts the reader thread, so the weights stream in
during the import. This module imports nothing heavy at module level.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicada.cloud import collector
from cicada.cloud.loading.registry import open_strategy
from cicada.cloud.timeline import Timeline
from cicada.common.errors import CicadaError


def minor_faults() -> int:
    """Minor page faults of this process so far (a mapped page touched for the first time)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def run_cold_start(
    package_dir: Path,
    input_path: Path,
    strategy: str = "cicada",
    device: str = "cpu",
    out_path: Path | None = None,
    timings_path: Path | None = None,
    threads: int | None = None,
    on_residency: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Cold-start the packaged model with `strategy`, run one forward, return the timings."""
    timeline = Timeline()
    entered = timeline.entered
    stop_recording = collector.record_collections(timeline)
    loader = open_strategy(
        strategy, package_dir, device=device, timeline=timeline, on_residency=on_residency
    )

    # The collector stays out of the import, and the import's objects out of later collections.
    with collector.quiet_import(), timeline.span("import", "torch"):
        import numpy as np
        import torch
    faults = {"import": minor_faults()}
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CicadaError("--device cuda was asked for, but torch sees no CUDA device")
    inputs = _load_input(input_path, device)

    output = loader.run(inputs)
    manifest = loader.manifest
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    first_result = timeline.mark("first_result")
    stop_recording()
    faults["to_first_result"] = minor_faults() - faults["import"]

    result = output.detach().to("cpu")
    if out_path is not None:
        np.save(
            out_path, result.numpy() if result.dtype != torch.bfloat16 else result.float().numpy()
        )
    timings = summarize(timeline, manifest.total_bytes, strategy, device, entered, first_result)
    timings["minor_faults"] = faults
    if timings_path is not None:
        Path(timings_path).write_text(json.dumps(timings, indent=1))
    return timings


def _load_input(path: Path, device: str) -> Any:
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CicadaError(f"cannot read input {path}: {exc} (expected a .npy array)") from None
    if array.dtype.kind not in "iuf b":
        raise CicadaError(f"input {path} has dtype {array.dtype}; expected ints or floats")
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def summarize(
    timeline: Timeline,
    total_bytes: int,
    strategy: str,
    device: str,
    entered: float,
    first_result: float,
) -> dict[str, Any]:
    spans = timeline.spans
    per_stage: dict[str, float] = {}
    for s in spans:
        if s.lane == "compute":
            per_stage[s.label] = per_stage.get(s.label, 0.0) + s.seconds
    read_spans = [s for s in spans if s.lane == "read"]
    read_wall = (
        (max(s.end for s in read_spans) - min(s.start for s in read_spans)) if read_spans else 0.0
    )
    io_busy = timeline.busy_seconds("read")
    compute_busy = timeline.busy_seconds("compute")
    return {
        "strategy": strategy,
        "device": device,
        "bytes": total_bytes,
        "process_start_s": entered,
        "import_s": timeline.lane_seconds("import"),
        "construct_s": timeline.lane_seconds("construct"),
        "read_s": read_wall,
        "read_gbps": total_bytes / read_wall / 1e9 if read_wall > 0 else None,
        # GPU loader: first copy enqueued -> last stage resident (cloud/loading/cuda.py).
        "transfer_s": timeline.lane_seconds("transfer"),
        "apply_s": timeline.lane_seconds("apply"),
        "wait_s": timeline.lane_seconds("wait"),
        "gc_s": timeline.lane_seconds(collector.GC_LANE),
        "compute_s": compute_busy,
        "compute_per_stage_s": per_stage,
        "last_stage_compute_s": _last_compute(spans),
        "time_to_first_result_s": first_result,
        # busy time of the I/O and compute lanes / (2 lanes x wall), wall = launch -> result
        "utilization": (io_busy + compute_busy) / (2 * first_result) if first_result else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "spans": [
            {"lane": s.lane, "label": s.label, "start": s.start, "end": s.end} for s in spans
        ],
    }


def _last_compute(spans: list[Any]) -> float:
    compute = [s for s in spans if s.lane == "compute"]
    return compute[-1].seconds if compute else 0.0
