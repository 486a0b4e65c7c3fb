"""The edge agent: serves a small ONNX model next to the coordinator, in milliseconds.

Never imports torch (tested): an edge device runs onnxruntime, numpy, pyzmq and psutil only.
Concurrency is bounded by `capacity` executor threads sharing one ONNX Runtime session (its
`run` is thread-safe); the I/O thread keeps heartbeating while they are busy, and reports the
device's CPU load from psutil.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from cicada.common.defaults import DEFAULT_ADDRESS, HEARTBEAT_INTERVAL_S
from cicada.common.errors import RegistrationRefused
from cicada.common.generation import (
    GenerationError,
    GenerationRequest,
    RecomputeDecoder,
    generate,
    limits_of,
)
from cicada.common.protocol import Dispatch, Result, Role, Status
from cicada.common.signals import StopRequest
from cicada.common.sockets import CurveKeys
from cicada.common.text import TextError, inputs_for, load_tokenizer
from cicada.common.worker import (
    EXIT_REFUSED,
    RuntimeConfig,
    Stream,
    WorkerRuntime,
    WorkerStatus,
)
from cicada.edge.drafter import draft_after_takeover
from cicada.edge.onnx_model import EdgeModel, EdgeModelError

log = logging.getLogger("cicada.edge")


@dataclass
class EdgeAgentConfig:
    model_dir: Path
    model_name: str
    coordinator: str = DEFAULT_ADDRESS
    worker: str = ""
    capacity: int = 2
    threads: int = 1  # intra-op threads per request
    int8: bool | None = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    curve: CurveKeys | None = None
    # Seconds at least between generated tokens: emulates a slower edge device (demos,
    # benchmarks, tests of a handoff mid-generation). 0 = as fast as the model runs.
    token_interval: float = 0.0
    # The same for the drafts after an exact takeover (None: token_interval).
    draft_interval: float | None = None


class EdgeAgent:
    def __init__(self, config: EdgeAgentConfig) -> None:
        self.config = config
        self.model = EdgeModel.load(
            config.model_dir, int8=config.int8, intra_op_num_threads=config.threads
        )
        self.tokenizer = load_tokenizer(self.model.path.parent, eager=True)  # text requests
        psutil.cpu_percent(None)  # prime: the first call always returns 0.0
        name = config.worker or f"edge-{socket.gethostname()}-{psutil.Process().pid}"
        self.runtime = WorkerRuntime(
            RuntimeConfig(
                address=config.coordinator,
                role=Role.EDGE,
                worker=name,
                models=[config.model_name],
                variant=self.model.variant,
                capacity=config.capacity,
                heartbeat_interval=config.heartbeat_interval,
                curve=config.curve,
                # Drafts after an exact takeover need the cached step graph (edge/drafter.py).
                drafts=self.model.new_drafter() is not None or None,
            ),
            handler=self.handle,
            status=lambda: WorkerStatus(compute_s=self.runtime.compute_estimate),
            load=lambda: psutil.cpu_percent(None) / 100.0,
        )

    def handle(self, dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        if "max_new_tokens" in dispatch.options:
            return self._generate(dispatch, deadline, stream)
        try:
            outputs = self.model.run(inputs_for(dispatch.options, dispatch.inputs, self.tokenizer))
        except (EdgeModelError, TextError) as exc:
            return Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc))
        return Result(id=dispatch.id, status=Status.OK, outputs=outputs, variant=self.model.variant)

    def _generate(self, dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        """Greedy generation on the exported cached step graph (decoder.onnx: keys and values
        kept between steps), or, for an export without one, recomputing the sequence each
        step. One PARTIAL per token."""
        config = self.model.info.get("edge_config") or {}
        try:
            request = GenerationRequest.parse(dispatch.options, list(dispatch.inputs))
            request.check_fits(*limits_of(config))
        except GenerationError as exc:
            return Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc))
        interval = self.config.token_interval
        last = [time.monotonic()]
        # An exact generation's tokens carry their position: after a takeover the ones still
        # in flight are drafts, which the coordinator forwards by position (section 12).
        exact = dispatch.options.get("exact") is True
        sent = [0]

        def logits(ids: np.ndarray) -> np.ndarray:
            return self.model.run([ids])[0]

        drafting_interval = self.config.draft_interval
        if drafting_interval is None:
            drafting_interval = interval

        def pace(gap: float = interval) -> None:
            if gap > 0:
                time.sleep(max(0.0, last[0] + gap - time.monotonic()))
                last[0] = time.monotonic()

        def emit(token: int) -> None:
            pace()
            stream.send([np.asarray([token], dtype=np.int64)], position=sent[0] if exact else None)
            sent[0] += 1

        def stop() -> bool:  # cancelled, or (the coordinator's first TOKENS) drafting now
            return stream.cancelled or (exact and stream.tokens_heard > 0)

        try:
            decoder = self.model.new_decoder() or RecomputeDecoder(logits)
            out = generate(decoder, request, emit, stop, deadline)
            if exact and not stream.cancelled and stream.tokens_heard > 0:
                drafter = self.model.new_drafter()
                if drafter is not None:
                    tokens = draft_after_takeover(
                        drafter, request, out.tokens, stream, deadline,
                        lambda: pace(drafting_interval),
                    )  # fmt: skip
                    timings = {"tokens": float(len(out.tokens)), "drafted": float(tokens)}
                    return Result(id=dispatch.id, status=Status.OK, timings=timings,
                                  variant=self.model.variant)  # fmt: skip
        except EdgeModelError as exc:
            return Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc))
        return Result(
            id=dispatch.id,
            status=Status.OK,
            outputs=[np.asarray(out.tokens, dtype=np.int64)],
            variant=self.model.variant,
            timings={"tokens": float(len(out.tokens))},
        )

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT, then drain (finish what runs, say DISCONNECT). Returns
        the exit code: 0, EXIT_REFUSED if the coordinator refused the registration, 4 if the
        runtime's I/O thread died."""
        stop = StopRequest()  # set from a signal handler: no lock (common/signals.py)
        stop.on_signals()
        self.runtime.start()
        log.info(
            "edge agent %s serving %s (%s) via %s",
            self.runtime.config.worker,
            self.config.model_name,
            self.model.variant,
            self.config.coordinator,
        )
        while not stop.wait(0.2):
            if self.runtime.stopped.is_set():
                if isinstance(self.runtime.error, RegistrationRefused):
                    return EXIT_REFUSED
                return 0 if self.runtime.error is None else 4
        self.runtime.drain()
        self.runtime.join(10)
        return 0
