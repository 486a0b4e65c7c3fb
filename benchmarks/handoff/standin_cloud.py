"""A WHAT-IF stand-in cloud worker: a real worker process speaking the wire protocol
(common/worker.py's WorkerRuntime, role cloud) whose "forward" sleeps a GPU profile's service
time and returns zero logits of the model's shape. It runs no model: it shows what the real
coordinator and edge agents do when the cloud is faster than the edge.

    python -m benchmarks.handoff.standin_cloud --coordinator tcp://... --model gpt2 \
        --name cloud-0 --service-s 0.005 --cold-start-s 5 --vocab 50257

It registers LOADING, sleeps `--cold-start-s` (the cold start it stands in for), logs
"<model> resident" (the line the benchmark's `parse_ready` reads), then serves READY. While
loading it reports an ETA (what is left of the cold start) and holds the work it takes until
ready, as a real cloud worker does (it reports an ETA and finishes work only once the weights
are resident): without one the coordinator counted no cloud at all during the cold start, so
no quality work could wait for it, unlike with the real worker.
SIGTERM drains (finish what runs, DISCONNECT) and exits 0, as `cicada cloud` does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from cicada.common.protocol import Dispatch, Result, Role, Status, WorkerState
from cicada.common.signals import StopRequest
from cicada.common.worker import RuntimeConfig, Stream, WorkerRuntime, WorkerStatus

VARIANT = "what-if-standin"

# The default GPU profile: GPT-2-medium, one forward of 32 tokens at batch 1 on an H100. NOT
# measured here (no GPU was lent) and no published batch-1 figure for this model was found; it
# is an estimate from NVIDIA's H100 SXM datasheet figures: weights 0.71 GB fp16 / 3.35 TB/s =
# 0.2 ms; 32 x 0.7 GFLOP / 989 TFLOP/s fp16 dense = 0.02 ms; so an eager PyTorch forward is
# bound by kernel launches: 24 layers x ~15 kernels x ~10 us = ~3.6 ms. 5 ms leaves margin.
# `--gpu-profile FILE` (JSON: {"service_s": seconds, "source": "..."}) replaces it with a
# measured figure.
DEFAULT_PROFILE = {
    "service_s": 0.005,
    "source": "estimate: GPT-2-medium, 32 tokens, batch 1, H100, eager PyTorch (launch-bound; "
    "H100 SXM datasheet: 3.35 TB/s, 989 TFLOP/s fp16); not measured here",
}
log = logging.getLogger("cicada.standin")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--service-s", type=float, required=True, help="one forward, batch 1")
    p.add_argument("--cold-start-s", type=float, default=0.0)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--capacity", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=0.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    resident = threading.Event()
    loaded_at = time.monotonic() + args.cold_start_s

    def status() -> WorkerStatus:
        if resident.is_set():
            return WorkerStatus(state=WorkerState.READY, resident_stages=1, total_stages=1)
        eta = max(0.0, loaded_at - time.monotonic())
        return WorkerStatus(state=WorkerState.LOADING, total_stages=1, eta_s=eta)

    def handler(dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        resident.wait()  # work taken while loading finishes once the weights are there
        start = time.monotonic()
        time.sleep(args.service_s)  # the profile's forward
        tokens = dispatch.inputs[0].shape[-1] if dispatch.inputs else 1
        logits = np.zeros((1, tokens, args.vocab), dtype=np.float32)
        return Result(id=dispatch.id, status=Status.OK, outputs=[logits],
                      timings={"compute_s": time.monotonic() - start})  # fmt: skip

    config = RuntimeConfig(
        address=args.coordinator, role=Role.CLOUD, worker=args.name, models=[args.model],
        variant=VARIANT, capacity=args.capacity, heartbeat_interval=args.heartbeat,
    )  # fmt: skip
    stop = StopRequest()
    stop.on_signals(signal.SIGTERM, signal.SIGINT)
    runtime = WorkerRuntime(config, handler, status).start()
    log.info("what-if stand-in %s: %.1f ms a forward, cold start %.1f s",
             args.name, args.service_s * 1e3, args.cold_start_s)  # fmt: skip
    if not stop.wait(args.cold_start_s):
        resident.set()
        log.info("%s resident", args.model)  # benchmarks/handoff/policies.parse_ready reads it
        runtime.notify()
    while not stop.wait(1.0) and not runtime.stopped.is_set():
        pass
    resident.set()  # stopped while loading: what it holds is answered, not left waiting
    runtime.drain()
    runtime.join(30)
    return 1 if runtime.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
