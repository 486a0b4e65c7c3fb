"""The cloud worker service: the Cicada pipeline behind the coordinator.

Start-up order is the point: the package is opened and the weight reader started, then the
worker registers with the coordinator while still cold (pyzmq imports in ~20 ms; torch takes
~1.25 s), then torch is imported and the model built. Residency progress goes out with every
stage. A request that arrives while loading starts at once on the resident stages and waits
only where its next stage is not resident; after that the model runs at full speed.

SIGTERM drains: nothing new is accepted, what runs finishes, DISCONNECT, exit 0. While loading
(before the model is built, so nothing has run) it abandons the build: queued work is answered
UNAVAILABLE, DISCONNECT, exit 0 (SIGALRM ends a build stuck in native code for 10 s). A
request the model fails on ends in a RESULT (BAD_REQUEST or FAILED) and the worker serves on;
should the serving loop itself die, the worker stops taking work, answers what it holds, says
DISCONNECT and exits non-zero (4), so that it is replaced rather than left registered and
unable to serve. A device failure (out of GPU memory, a CUDA error), while loading or running,
answers UNAVAILABLE (not the caller's fault: the coordinator gives the request another chance)
and the worker exits EXIT_DEVICE_FAILED (6) for replacement: its CUDA context may be poisoned.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cicada.cloud import collector
from cicada.cloud.batching import (
    PADDED,
    BatchCost,
    Batcher,
    BatchPolicy,
    Item,
    cut_sequences,
    pad_and_join,
    rows,
    shape_key,
)
from cicada.cloud.loading.base import device_failure
from cicada.cloud.pipeline import ColdStart, ResidencyEvent
from cicada.cloud.timeline import Timeline
from cicada.common.defaults import DEFAULT_ADDRESS, HEARTBEAT_INTERVAL_S
from cicada.common.errors import CicadaError, DeviceError, RegistrationRefused
from cicada.common.generation import (
    Generated,
    GenerationError,
    GenerationRequest,
    generate,
    limits_of,
)
from cicada.common.inputs import InputError, InputLimits
from cicada.common.launch import WorkerSpec
from cicada.common.protocol import Dispatch, Result, Role, Status, WorkerState
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

if TYPE_CHECKING:
    from cicada.cloud.continuous import DecodeStream, Streams

log = logging.getLogger("cicada.cloud")
T = TypeVar("T")
# A request handed from the runtime's executor thread to the main thread.
Work = tuple[Dispatch, float | None, Stream, "Future[Result]"]

# The batching key of generation requests where the model decodes streams together.
GENERATE_KEY = ("generate",)
LOADER_EXIT_WAIT_S = 10.0  # after a failed load, its threads' time to end before the exit

# Before the first stage lands the worker can only guess its ETA from what is left of the
# import (`import torch`: ~1.25 s on an idle 2-core machine, longer in proportion to the load),
# the construction, and the read (at the rate read so far).
ASSUMED_IMPORT_S = 1.25
ASSUMED_CONSTRUCT_S = 0.2
ASSUMED_READ_BPS = 1.0e9
EXIT_LOAD_FAILED = 3
EXIT_SERVING_FAILED = 4  # the serving loop died: the lifecycle replaces the worker
EXIT_DEVICE_FAILED = 6  # out of device memory / a CUDA error: the context may be poisoned
STOP_WHILE_LOADING_GRACE_S = 10  # then SIGALRM ends a build stuck in native code


class _StopWhileLoading(BaseException):
    """Raised by the signal handler into a build that SIGTERM abandons (not an Exception:
    no handler on the way may swallow it)."""


@dataclass
class CloudWorkerConfig:
    package: Path
    model_name: str
    coordinator: str = DEFAULT_ADDRESS
    worker: str = ""
    device: str = "cpu"
    threads: int | None = None
    # CPU: when the one-token decode and verify forwards run on row-invariant linears
    # (common.defaults.ROW_INVARIANCE, cloud/few_rows.py).
    row_invariant: str = "auto"
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    curve: CurveKeys | None = None
    health_port: int | None = None  # serve /ready and /healthz for orchestrators (Knative)
    health_host: str = "127.0.0.1"  # loopback unless told (a pod's probes need 0.0.0.0)
    # Run a package's factory even if it is outside the allow-list (common/factory.py).
    trust_package_code: bool = False
    # Dynamic batching settings (cloud/batching.py) over the package's defaults (its manifest's
    # `batching`); with neither, one dispatch at a time.
    batch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: WorkerSpec) -> CloudWorkerConfig:
        """The worker a launcher asked for (warm pool fork, Ray actor)."""
        keys = (
            CurveKeys.load(Path(spec.curve_key), Path(spec.server_key))
            if spec.curve_key and spec.server_key
            else None
        )
        return cls(
            package=Path(spec.package),
            model_name=spec.model,
            coordinator=spec.coordinator,
            worker=spec.name,
            device=spec.device,
            threads=spec.threads,
            row_invariant=spec.row_invariant,
            heartbeat_interval=spec.heartbeat,
            curve=keys,
            trust_package_code=spec.trust_package_code,
            batch=spec.batching(),
        )


class CloudWorker:
    def __init__(self, config: CloudWorkerConfig) -> None:
        self.config = config
        self.timeline = Timeline()
        self.cold = ColdStart(
            config.package, device=config.device, timeline=self.timeline,
            trust_package_code=config.trust_package_code,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(config.package)  # read on the first text request
        self.built = threading.Event()
        self._load_interruptible = False  # SIGTERM may abandon the build (see _on_stop_signal)
        self.failed: CicadaError | None = None
        self._last: ResidencyEvent | None = None
        # protocol.PHASES: importing -> constructing -> loading -> ready, and when each began.
        self._phase, self._phase_at = "importing", time.monotonic()
        self._import_expected_s = ASSUMED_IMPORT_S * _load_factor()
        self._limits: InputLimits | None = None
        self._warmed = False  # a forward has run with every stage resident
        # Held while a request is queued for the main thread and while `failed` is set, so
        # that no request is queued after the last look at the queue.
        self._accepting = threading.Lock()
        self._work: queue.Queue[Work] = queue.Queue()
        self.batching = _batch_policy(self.cold.manifest.batching, config.batch)
        self._batcher = Batcher(
            self._work, self.batching, self._prepare, deadline_of=lambda work: work[1]
        )
        self.batch_cost = BatchCost()  # steady forwards' time by batch size (READY reports it)
        self._batches = 0  # forwards of more than one request so far (`batch_seq`)
        # Generation streams decoded together (cloud/continuous.py), once the model is built
        # and only where it batches: else generation runs one request at a time.
        self._streams: Streams | None = None
        self._waiting: deque[Work] = deque()  # generations past the streams' limit, in order
        self._generations = False  # one has arrived: the weights are worth reordering
        name = config.worker or f"cloud-{socket.gethostname()}-{os.getpid()}"
        self.runtime = WorkerRuntime(
            RuntimeConfig(
                address=config.coordinator,
                role=Role.CLOUD,
                worker=name,
                models=[config.model_name],
                variant=f"{config.model_name}-{config.device}",
                # One dispatch at a time, or up to a batch's worth (queued here, run together).
                capacity=self.batching.max_batch_size,
                heartbeat_interval=config.heartbeat_interval,
                curve=config.curve,
                drafts=self._verifies_drafts() or None,
            ),
            handler=self.handle,
            status=self.status,
        )
        self.cold.subscribe(self._on_residency)
        # A failed load (a reader's error, a stall) fails the worker at once, with no request
        # needed to find out: /healthz says so, and the serving loop gives up (exit 3).
        self.cold.on_error(self._on_load_error)

    def _verifies_drafts(self) -> bool:
        """Whether this worker decodes exact generations with an edge's drafts (section 12):
        Cicada's reference GPT-2 (the Verifier's model), one generation at a time (a worker
        that batches generations decodes them in its continuous streams, without drafts)."""
        factory = self.cold.manifest.architecture.factory
        return factory.startswith("cicada.cloud.models.gpt2:") and not self.batching.batching

    def _on_load_error(self, error: CicadaError) -> None:
        log.error("the load failed: %s", error)
        self._fail(error)
        self.runtime.notify()

    def _enter(self, phase: str) -> None:
        self._phase, self._phase_at = phase, time.monotonic()
        self.runtime.notify()

    def status(self) -> WorkerStatus:
        """State, residency and phase, as READY and HEARTBEAT report them (PROTOCOL.md 4).

        Stages count as resident once applied to the built model; the bytes read and verified
        are reported apart (`read_*`), since on CPU the reader is done before torch is
        imported. The ETA before any stage is resident adds what is left of the import (its
        expected length grows once overrun: it is a guess) and of the construction, or the
        rest of the read if that takes longer."""
        cold = self.cold
        total = len(cold.manifest.stages)
        last, phase = self._last, self._phase
        in_phase = time.monotonic() - self._phase_at
        if last is not None and last.done and self.built.is_set() and self.failed is None:
            state, resident, eta = WorkerState.READY, total, 0.0
            if phase != "ready":
                self._phase, self._phase_at, in_phase = "ready", time.monotonic(), 0.0
            phase = "ready"
        elif phase in ("importing", "constructing"):
            if phase == "importing":
                rest = _left(self._import_expected_s, in_phase) + ASSUMED_CONSTRUCT_S
            else:
                rest = _left(ASSUMED_CONSTRUCT_S, in_phase)
            state, resident = WorkerState.COLD, 0 if last is None else last.resident_stages
            eta = max(rest, cold.read_eta(ASSUMED_READ_BPS))
        else:
            state = WorkerState.LOADING if last is not None else WorkerState.COLD
            resident = 0 if last is None else last.resident_stages
            eta = cold.read_eta(ASSUMED_READ_BPS) if last is None else last.eta_s
        unit_s, marginal = self.batch_cost.fit()
        return WorkerStatus(
            state, resident, total, eta, unit_s, phase=phase, phase_s=in_phase,
            read_stages=cold.read_stages, read_bytes=cold.read_bytes,
            total_bytes=cold.manifest.total_bytes, batch_marginal=marginal,
        )  # fmt: skip

    def _on_residency(self, event: ResidencyEvent) -> None:
        self._last = event
        if event.done:
            log.info("%s resident: %d stages", self.config.model_name, event.total_stages)
            if self._generations:
                self._reorder_for_decoding()
        self.runtime.notify()

    def _generation_arrived(self) -> None:
        self._generations = True
        if self.cold.all_resident:
            self._reorder_for_decoding()

    def _reorder_for_decoding(self) -> None:
        """One-token steps and verify forwards of the reference GPT-2 and of continuous
        batching run on oneDNN with each row computed alike (cloud/few_rows.py); the weights
        are reordered for that kernel on a background thread, so that no token waits for it.
        Only once every stage is resident (a copy of weights not yet loaded is stale, and is
        never made again) and a generation has come (the copy is the weights' size again:
        1.42 GB for GPT-2 medium, which a worker that only runs forwards never reads), and
        only where row_linear takes that kernel (not on one thread, by default)."""
        from cicada.cloud.few_rows import reorder_in_background, rows_available
        from cicada.cloud.models.gpt2 import GPT

        try:
            model = self.cold.model
        except RuntimeError:  # not built (a failed load reports itself elsewhere)
            return
        if not rows_available(self.config.device):
            return
        if isinstance(model, GPT) or self._streams is not None:
            log.info("reordering %s's weights for decoding", self.config.model_name)
            reorder_in_background(model)

    def handle(self, dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        """Called on the runtime's executor thread: hand the request to the main thread.

        torch's OpenMP pool belongs to the thread that started it; a forward issued from
        another thread waited ~100 ms per call here for a 1 ms model (2 cores). So every
        forward runs on the main thread, one at a time (torch already uses every core)."""
        done: Future[Result] = Future()
        with self._accepting:
            if self.failed is not None:
                return Result(id=dispatch.id, status=Status.UNAVAILABLE, error=str(self.failed))
            self._work.put((dispatch, deadline, stream, done))
        return done.result()

    def _fail(self, error: CicadaError) -> None:
        """Take no more work: from now on `handle` answers UNAVAILABLE at once."""
        with self._accepting:
            if self.failed is None:
                self.failed = error

    def _serve_one(
        self,
        dispatch: Dispatch,
        deadline: float | None,
        stream: Stream,
        done: Future[Result],
        arrays: list[Any] | None = None,
    ) -> None:
        """Run one request on this (the main) thread; whatever the model does, it ends in a
        RESULT. An exception that is not an Exception (SystemExit, KeyboardInterrupt) still
        answers the request, then ends the serving loop."""
        try:
            result = self._run(dispatch, deadline, stream, arrays)
        except Exception as exc:
            log.exception("request %s failed", dispatch.id)
            if device_failure(exc):  # e.g. an asynchronous CUDA error seen at the copy out
                result = self._device_failed(dispatch, exc)
            else:
                result = Result(
                    id=dispatch.id, status=Status.FAILED, error=f"{type(exc).__name__}: {exc}"
                )
        except BaseException as exc:
            done.set_result(
                Result(
                    id=dispatch.id,
                    status=Status.FAILED,
                    error=f"the worker stopped while running it ({type(exc).__name__})",
                )
            )
            raise
        done.set_result(result)

    def input_limits(self) -> InputLimits:
        """The package's limits on a request's inputs: for a model of token ids, its context
        and vocabulary (from the package's config, else the built model's config object)."""
        if self._limits is None:
            from cicada.cloud.generate import context_of

            context, vocab = limits_of(self.cold.manifest.architecture.config)
            if context is None and vocab is None:
                context, vocab = context_of(self.cold.model)
            self._limits = InputLimits.for_tokens(context, vocab)
        return self._limits

    def _refusal(self, dispatch: Dispatch, deadline: float | None) -> Result | None:
        """The answer to a request that must not run now (the worker failed, or its deadline
        passed while the model was being built or while queued here: never run late)."""
        if self.failed is not None:
            return Result(id=dispatch.id, status=Status.UNAVAILABLE, error=str(self.failed))
        if deadline is not None and time.monotonic() >= deadline:
            return Result(
                id=dispatch.id,
                status=Status.TIMEOUT,
                error="deadline passed before the model could start it",
            )
        return None

    def _inputs(self, dispatch: Dispatch) -> list[Any] | Result:
        """The request's input arrays, checked against the package's limits."""
        try:
            arrays = inputs_for(dispatch.options, dispatch.inputs, self.tokenizer)
            self.input_limits().check(arrays)
        except (TextError, InputError) as exc:
            return Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc))
        return arrays

    def _run(
        self,
        dispatch: Dispatch,
        deadline: float | None,
        stream: Stream,
        arrays: list[Any] | None = None,
    ) -> Result:
        refusal = self._refusal(dispatch, deadline)
        if refusal is not None:
            return refusal
        if "max_new_tokens" in dispatch.options:
            return self._generate(dispatch, deadline, stream)
        if arrays is None:
            parsed = self._inputs(dispatch)
            if isinstance(parsed, Result):
                return parsed
            arrays = parsed
        inputs = self._tensors(arrays)
        during_load = not self.cold.all_resident
        start = time.monotonic()
        out = self._guarded(dispatch, "inputs", lambda: self.cold.forward(*inputs))
        if isinstance(out, Result):
            return out
        outputs = self._arrays(out)
        timings = self._forward_timings(1, time.monotonic() - start, during_load)
        return Result(id=dispatch.id, status=Status.OK, outputs=outputs, timings=timings)

    def _tensors(self, arrays: list[Any]) -> list[Any]:
        import numpy as np
        import torch

        inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if self.config.device != "cpu":
            inputs = [t.to(self.config.device) for t in inputs]
        return inputs

    @staticmethod
    def _arrays(out: Any) -> list[Any]:
        """A forward's output(s) as numpy arrays on the host (bfloat16 as float32)."""
        import torch

        outputs: list[Any] = [out] if isinstance(out, torch.Tensor) else list(out)
        return [
            o.detach().to("cpu").float().numpy()
            if o.dtype == torch.bfloat16
            else o.detach().to("cpu").numpy()
            for o in outputs
        ]

    def _forward_timings(self, size: int, seconds: float, during_load: bool) -> dict[str, float]:
        """A forward's timings, shared by every request it ran (`batch_size` of them)."""
        timings = {"compute_s": seconds}
        if self.batching.batching:
            timings["batch_size"] = float(size)
        if during_load:
            timings["during_load"] = 1.0
        elif not self._warmed:
            # The first forward on the whole model maps the weights' pages and warms the
            # allocator: 4 s where the next took 1.7 s (GPT-2-medium, busy 2-core machine).
            # It is no estimate of the next one (common/worker.py leaves it out).
            self._warmed = True
            timings["warmup"] = 1.0
        else:
            self.batch_cost.observe(size, seconds)
        return timings

    # -- dynamic batching (cloud/batching.py) ------------------------------------------------

    def _prepare(self, work: Work) -> Item[Work] | None:
        """Called by the batcher for each request it takes: answer at once what must not run
        (expired, refused inputs), else say what it may batch with (generations go together
        to the decoding streams where the model batches them, else alone).
        Whatever the checks raise ends that request FAILED, never the serving loop."""
        try:
            return self._sort(work)
        except Exception as exc:
            log.exception("request %s failed", work[0].id)
            error = f"{type(exc).__name__}: {exc}"
            work[3].set_result(Result(id=work[0].id, status=Status.FAILED, error=error))
            return None

    def _sort(self, work: Work) -> Item[Work] | None:
        dispatch, deadline, _stream, done = work
        refusal = self._refusal(dispatch, deadline)
        if refusal is not None:
            done.set_result(refusal)
            return None
        now = time.monotonic()
        if "max_new_tokens" in dispatch.options:
            return Item(work, GENERATE_KEY if self._streams is not None else None, now)
        if not self.batching.batching:
            return Item(work, None, now)
        arrays = self._inputs(dispatch)
        if isinstance(arrays, Result):
            done.set_result(arrays)
            return None
        return Item(work, shape_key(arrays, pad=self.batching.pad_sequences), now, arrays)

    def _serve_batch(self, batch: list[Item[Work]]) -> None:
        """Run a batch as one forward; each request gets its own RESULT. Whatever happens,
        every request of the batch is answered; a BaseException ends the serving loop after.
        Generations join the streams being decoded instead (`_join`)."""
        if batch[0].key == GENERATE_KEY:
            for i, item in enumerate(batch):
                try:
                    self._join(item.work)
                except BaseException as exc:  # those not joined yet are answered too
                    for rest in batch[i + 1 :]:
                        rest.work[3].set_result(_stopped(rest.work[0], exc))
                    raise
            return
        if len(batch) == 1:
            (dispatch, deadline, stream, done), arrays = batch[0].work, batch[0].inputs
            self._serve_one(dispatch, deadline, stream, done, arrays or None)
            return
        try:
            self._run_batch(batch)
        except BaseException as exc:
            for item in batch:
                done = item.work[3]
                if not done.done():
                    done.set_result(
                        Result(
                            id=item.work[0].id,
                            status=Status.FAILED,
                            error=f"the worker stopped while running it ({type(exc).__name__})",
                        )
                    )
            raise

    def _run_batch(self, batch: list[Item[Work]]) -> None:
        import numpy as np

        live: list[Item[Work]] = []
        for item in batch:  # each its own deadline: one that passed while waiting is not run
            dispatch, deadline, _stream, done = item.work
            refusal = self._refusal(dispatch, deadline)
            if refusal is not None:
                done.set_result(refusal)
            else:
                live.append(item)
        if len(live) <= 1:
            for item in live:
                self._serve_batch([item])
            return
        sizes = [rows(item.inputs) for item in live]
        total = sum(sizes)
        padded = isinstance(live[0].key, tuple) and live[0].key[:1] == (PADDED,)
        during_load = not self.cold.all_resident
        start = time.monotonic()
        try:
            lengths: list[int] = []  # each request's sequence, where padded
            longest = 0
            if padded:  # sequences of different lengths, each padded to the longest
                joined, lengths = pad_and_join([item.inputs for item in live])
                longest = max(lengths)
            else:
                joined = [
                    np.concatenate([item.inputs[j] for item in live])
                    for j in range(len(live[0].inputs))
                ]
            outputs = self._arrays(self.cold.forward(*self._tensors(joined)))
            if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
                raise ValueError("an output does not have one row per input row")
            mine = []
            offset = 0
            for k, size in enumerate(sizes):
                rows_of = [o[offset : offset + size] for o in outputs]
                if padded:
                    rows_of = cut_sequences(
                        rows_of, lengths[k], longest, self.batching.sequence_outputs
                    )
                mine.append(rows_of)
                offset += size
        except CicadaError as exc:  # the load failed: nothing can run
            self._fail(exc)
            for item in live:
                item.work[3].set_result(
                    Result(id=item.work[0].id, status=Status.UNAVAILABLE, error=str(exc))
                )
            return
        except Exception as exc:
            # A batch must not fail requests that would have succeeded alone: run them one
            # by one, and each that fails alone ends as it would have (FAILED, BAD_REQUEST).
            log.warning("a batch of %d failed (%s: %s): running them one by one",
                        len(live), type(exc).__name__, exc)  # fmt: skip
            for item in live:
                self._serve_batch([item])
            return
        timings = self._forward_timings(len(live), time.monotonic() - start, during_load)
        if padded:
            timings["batch_padded_to"] = float(longest)
        self._batches += 1
        offset = 0
        for item, size, outs in zip(live, sizes, mine, strict=True):
            dispatch, _deadline, _stream, done = item.work
            # Where its rows sat in the batch: with `batch_size` (and `batch_padded_to`), enough
            # to replay the forward.
            own = {**timings, "batch_row": float(offset), "batch_seq": float(self._batches)}
            offset += size
            done.set_result(Result(id=dispatch.id, status=Status.OK, outputs=outs, timings=own))

    def _guarded(self, dispatch: Dispatch, what: str, run: Callable[[], T]) -> T | Result:
        """Run the model; a failed load makes the worker UNAVAILABLE, and so does a device
        failure (out of memory, a CUDA error: the worker then exits for replacement); inputs
        the model refuses are the caller's BAD_REQUEST; anything else it raises (an
        assertion) is FAILED (`_serve_one`), and the worker keeps serving."""
        try:
            return run()
        except CicadaError as exc:
            self._fail(exc)
            return Result(id=dispatch.id, status=Status.UNAVAILABLE, error=str(exc))
        except Exception as exc:
            if device_failure(exc):  # a RuntimeError, but not the caller's fault
                return self._device_failed(dispatch, exc)
            if not isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
                raise
            return Result(
                id=dispatch.id,
                status=Status.BAD_REQUEST,
                error=f"the model refused the {what}: {type(exc).__name__}: {exc}",
            )

    def _device_failed(self, dispatch: Dispatch, exc: BaseException) -> Result:
        """The device failed under this request: it ends UNAVAILABLE (the coordinator gives it
        another chance elsewhere), and the worker takes no more work and exits
        EXIT_DEVICE_FAILED, since its CUDA context may be poisoned."""
        error = DeviceError(f"the device failed: {type(exc).__name__}: {exc}")
        log.error("%s; this worker exits for replacement", error)
        self._fail(error)
        return Result(id=dispatch.id, status=Status.UNAVAILABLE, error=str(error))

    def _generate(self, dispatch: Dispatch, deadline: float | None, stream: Stream) -> Result:
        """Greedy generation with a KV cache, one PARTIAL per token (see cloud/generate.py)."""
        import numpy as np

        from cicada.cloud.generate import can_verify, context_of, decoder_for, verify

        model = self.cold.model
        self._generation_arrived()
        try:
            request = GenerationRequest.parse(dispatch.options, list(dispatch.inputs))
            request.check_fits(*context_of(model))
            decoder = decoder_for(model, self.config.device, call=self.cold.call)
            if request.draft is not None and not can_verify(decoder):
                raise GenerationError(f"{type(model).__name__} cannot verify a draft (exact)")
        except GenerationError as exc:
            return Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc))
        during_load = not self.cold.all_resident
        start = time.monotonic()
        if request.draft is not None and not during_load and self._verifies_drafts():
            return self._generate_drafted(dispatch, request, deadline, stream)

        def run() -> Generated:
            rest, first = request, None
            if request.draft is not None:  # an exact takeover: verify the draft first
                verdict, first = verify(decoder, request)
                stream.verdict(verdict.accepted)
                if first is None:
                    return Generated([], "length")
                rest = request.continued(verdict.accepted)
            return generate(
                decoder,
                rest,
                lambda token: stream.send([np.asarray([token], dtype=np.int64)]),
                lambda: stream.cancelled,
                deadline,
                first=first,
            )

        out = self._guarded(dispatch, "prompt", run)
        if isinstance(out, Result):
            return out
        timings = {"compute_s": time.monotonic() - start, "tokens": float(len(out.tokens))}
        if during_load:
            timings["during_load"] = 1.0
        return Result(
            id=dispatch.id,
            status=Status.OK,
            outputs=[np.asarray(out.tokens, dtype=np.int64)],
            timings=timings,
        )

    def _generate_drafted(
        self,
        dispatch: Dispatch,
        request: GenerationRequest,
        deadline: float | None,
        stream: Stream,
    ) -> Result:
        """An exact takeover decoded with the drafting edge's tokens (cloud/drafted.py)."""
        import numpy as np

        from cicada.cloud.drafted import DraftStats, drafted_generate
        from cicada.cloud.speculative import Verifier

        start = time.monotonic()
        verifier = Verifier(self.cold.model, self.config.device)
        stats = DraftStats()

        def run() -> Generated:
            out, done = drafted_generate(
                verifier,
                request,
                stream,
                stream.verdict,
                lambda token: stream.send([np.asarray([token], dtype=np.int64)]),
                deadline,
            )
            stats.__dict__.update(done.__dict__)
            return out

        out = self._guarded(dispatch, "prompt", run)
        if isinstance(out, Result):
            return out
        timings = {"compute_s": time.monotonic() - start, "tokens": float(len(out.tokens))}
        timings.update(stats.timings())
        return Result(
            id=dispatch.id,
            status=Status.OK,
            outputs=[np.asarray(out.tokens, dtype=np.int64)],
            timings=timings,
        )

    # -- continuous batching of generations (cloud/continuous.py) ----------------------------

    def _continuous_streams(self) -> Streams | None:
        """Streams decoded together up to max_batch_size, where the model allows it."""
        from cicada.cloud.continuous import Streams, batchable

        model = self.cold.model
        if not self.batching.batching or not batchable(model):
            return None
        # Built before the weights are resident: _reorder_for_decoding reorders them later.
        return Streams(model, self.config.device, limit=self.batching.max_batch_size, reorder=False)

    @property
    def _decoding(self) -> bool:
        return self._streams is not None and bool(self._streams.active or self._waiting)

    def _join(self, work: Work) -> None:
        """Start a generation: prefill its prompt and send its first token; it then decodes
        with the others at every step. Past the limit it waits for a stream to leave."""
        dispatch, done = work[0], work[3]
        streams = self._streams
        assert streams is not None
        if streams.full:
            self._waiting.append(work)
            return
        try:
            self._start_stream(streams, work)
        except Exception as exc:
            log.exception("request %s failed", dispatch.id)
            result = (
                self._device_failed(dispatch, exc)
                if device_failure(exc)
                else Result(
                    id=dispatch.id, status=Status.FAILED, error=f"{type(exc).__name__}: {exc}"
                )
            )
            done.set_result(result)
        except BaseException as exc:
            done.set_result(_stopped(dispatch, exc))
            raise

    def _start_stream(self, streams: Streams, work: Work) -> None:
        import numpy as np

        from cicada.cloud.continuous import DecodeStream
        from cicada.cloud.generate import context_of

        dispatch, deadline, stream, done = work
        self._generation_arrived()
        refusal = self._refusal(dispatch, deadline)
        if refusal is not None:
            done.set_result(refusal)
            return
        try:
            request = GenerationRequest.parse(dispatch.options, list(dispatch.inputs))
            request.check_fits(*context_of(streams.model))
        except GenerationError as exc:
            done.set_result(Result(id=dispatch.id, status=Status.BAD_REQUEST, error=str(exc)))
            return
        decoding = DecodeStream(
            request,
            lambda token: stream.send([np.asarray([token], dtype=np.int64)]),
            lambda: stream.cancelled,
            deadline,
            owner=(work, not self.cold.all_resident),
            verdict=stream.verdict,
        )
        # The prefill goes through ColdStart.call: during a cold start it runs on the
        # resident stages and its first token goes out once every stage checked out.
        out = self._guarded(
            dispatch,
            "prompt",
            lambda: streams.start(
                decoding, lambda ids, cache: self.cold.call("decode", ids, cache, 0)
            ),
        )
        if isinstance(out, Result):
            done.set_result(out)
        elif decoding.stopped is not None:
            self._finish_stream(decoding)

    def _decode_step(self) -> None:
        """Admit the generations waiting for room, then one token for every stream."""
        streams = self._streams
        assert streams is not None
        while self._waiting and not streams.full:
            self._join(self._waiting.popleft())
        if not streams.active:
            return
        if self.failed is not None:  # the coordinator gives them another chance elsewhere
            for s in streams.active:
                self._end_stream(s, Result(id=s.owner[0][0].id, status=Status.UNAVAILABLE,
                                           error=str(self.failed)))  # fmt: skip
            streams.active = []
            return
        try:
            finished = streams.step()
        except BaseException as exc:
            finished = self._step_failed(streams, exc)
        for s in finished:
            self._finish_stream(s)

    def _step_failed(self, streams: Streams, exc: BaseException) -> list[DecodeStream]:
        """A batched step raised (and changed nothing). A device failure or a failed load ends
        every stream UNAVAILABLE; anything else must not fail streams that would decode alone:
        each steps alone, and one that fails alone ends FAILED."""
        group, streams.active = streams.active, []
        if isinstance(exc, CicadaError) or device_failure(exc) or not isinstance(exc, Exception):
            for s in group:
                dispatch = s.owner[0][0]
                if isinstance(exc, CicadaError):
                    self._fail(exc)
                    result = Result(id=dispatch.id, status=Status.UNAVAILABLE, error=str(exc))
                elif isinstance(exc, Exception):
                    result = self._device_failed(dispatch, exc)
                else:
                    result = _stopped(dispatch, exc)
                self._end_stream(s, result)
            if not isinstance(exc, Exception):
                raise exc
            return []
        log.warning("a decoding step of %d streams failed (%s: %s): stepping them one by one",
                    len(group), type(exc).__name__, exc)  # fmt: skip
        finished: list[DecodeStream] = []
        for s in group:
            try:
                finished += streams.step(only=[s])
            except Exception as alone:
                log.exception("request %s failed", s.owner[0][0].id)
                error = f"{type(alone).__name__}: {alone}"
                self._end_stream(s, Result(id=s.owner[0][0].id, status=Status.FAILED, error=error))
                continue
            if s.stopped is None:
                streams.active.append(s)
        return finished

    def _finish_stream(self, s: DecodeStream) -> None:
        import numpy as np

        (dispatch, *_), during_load = s.owner
        timings = {
            "compute_s": time.monotonic() - s.started,
            "tokens": float(len(s.tokens)),
            # The most streams this one was decoded with in a step (1: it ran alone).
            "decode_streams": float(s.peak),
        }
        if during_load:
            timings["during_load"] = 1.0
        outputs = [np.asarray(s.tokens, dtype=np.int64)]
        self._end_stream(s, Result(id=dispatch.id, status=Status.OK, outputs=outputs,
                                   timings=timings))  # fmt: skip

    @staticmethod
    def _end_stream(s: DecodeStream, result: Result) -> None:
        done = s.owner[0][3]
        if not done.done():
            done.set_result(result)

    def serve_forever(self) -> int:
        """Register, load, serve until SIGTERM. Returns the process exit code: 0 after a
        drain, EXIT_LOAD_FAILED, EXIT_SERVING_FAILED if the serving loop died, or EXIT_REFUSED
        if the coordinator refused the registration."""
        stop = StopRequest()  # set from a signal handler: no lock (common/signals.py)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, _: self._on_stop_signal(stop, signum))
            signal.signal(signal.SIGINT, lambda signum, _: self._on_stop_signal(stop, signum))
        try:
            return self._serve(stop)
        except BaseException as exc:  # never stay registered (and `ready`) unable to serve
            log.exception("the serving loop died")
            code = EXIT_SERVING_FAILED if self.built.is_set() else EXIT_LOAD_FAILED
            return self._give_up(
                CicadaError(f"the worker's serving loop died ({type(exc).__name__}: {exc})"), code
            )

    def _on_stop_signal(self, stop: StopRequest, signum: int) -> None:
        """SIGTERM/SIGINT. Once the model is built: drain (the serving loop sees `stop`).
        Before: no request has run yet, so the build is abandoned at once — a build that
        stalls (a hung file system, a factory that never returns) must not make the worker
        deaf to SIGTERM. A build stuck in native code that never returns to Python is ended
        by SIGALRM's default action after STOP_WHILE_LOADING_GRACE_S. Nothing here takes a
        lock or starts a thread: a second signal may arrive while this one runs."""
        stop.signalled(signum)
        if self._load_interruptible and not self.built.is_set():
            self._load_interruptible = False
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(STOP_WHILE_LOADING_GRACE_S)
            raise _StopWhileLoading

    def _serve(self, stop: StopRequest) -> int:
        self.runtime.start()  # registers while cold
        failure: BaseException | None = None
        try:
            self._load_interruptible = True
            if stop.is_set():  # a signal before the flag was up
                raise _StopWhileLoading
            self._build()
        except (_StopWhileLoading, Exception) as exc:
            failure = exc
        finally:
            self._load_interruptible = False  # from here on SIGTERM drains, whatever happened
        if isinstance(failure, _StopWhileLoading):
            signal.alarm(0)  # the build returned to Python: the drain below ends the process
            log.warning("stopped while loading: the model was not built")
            return self._give_up(CicadaError("stopped while loading"), 0)
        if isinstance(failure, CicadaError):
            return self._give_up(failure, _exit_code(failure))
        if failure is not None:
            if not device_failure(failure):
                raise failure
            error = DeviceError(
                f"the device failed while building: {type(failure).__name__}: {failure}"
            )
            return self._give_up(error, EXIT_DEVICE_FAILED)
        while not stop.is_set() and not self.runtime.stopped.is_set():
            if not self._serve_round(0.1) and self.failed is not None:
                return self._give_up(self.failed, _exit_code(self.failed))
        if isinstance(self.runtime.error, RegistrationRefused):  # registering again: refused
            return self._give_up(self.runtime.error, EXIT_REFUSED)
        if self.runtime.error is not None:  # its I/O thread died: nothing can be answered
            return self._give_up(
                CicadaError(f"the worker's I/O thread died ({self.runtime.error})"),
                EXIT_SERVING_FAILED,
            )
        self.runtime.drain()
        while not self.runtime.join(0.05):  # finish what was accepted before the drain
            self._serve_pending()
        self._serve_pending()
        return 0

    def _build(self) -> None:
        """Import torch and build the model; on return the worker can serve."""
        if self.config.health_port is not None:
            self._serve_health(self.config.health_host, self.config.health_port)
        with collector.quiet_import():  # no collection in the import, none of it later
            import torch

        from cicada.cloud.few_rows import set_row_invariance

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        set_row_invariance(self.config.row_invariant)
        self._enter("constructing")
        # The rest of the load (read, verify, apply) finishes on the reader thread while
        # this thread serves: a request that arrives now starts on the resident stages.
        self.cold.build()
        self._load_interruptible = False
        self._streams = self._continuous_streams()
        self.built.set()
        self._enter("loading")  # READY may be due now (if every stage arrived first)

    def _serve_health(self, host: str, port: int) -> None:
        """/ready is 200 only once every stage is resident (a readiness probe that reflects
        residency); /healthz is 200 unless the load failed. JSON bodies carry the status."""
        import json
        from http.server import BaseHTTPRequestHandler

        from cicada.common.httpd import serve_http

        worker = self

        class Health(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status = worker.status()
                ready = status.state is WorkerState.READY and worker.failed is None
                if self.path == "/ready":
                    code = 200 if ready else 503
                elif self.path == "/healthz":
                    code = 200 if worker.failed is None else 500
                else:
                    code = 404
                body = json.dumps(
                    {
                        "state": status.state.value,
                        "resident_stages": status.resident_stages,
                        "total_stages": status.total_stages,
                        "eta_s": status.eta_s,
                        "error": str(worker.failed) if worker.failed else None,
                    }
                ).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the log

        # Idle connections are closed after a timeout, and held in bounded number (httpd.py).
        serve_http(host, port, Health, "cicada-health")
        log.info("health endpoint on http://%s:%d/ready", host, port)

    def _serve_round(self, timeout: float) -> bool:
        """Serve what arrived (waiting up to `timeout` for it when no stream is decoding),
        then one step of the streams; False when there was nothing to do."""
        decoding = self._decoding
        # While streams decode, a forward batch takes what is queued: no waiting for company.
        batch = self._batcher.next(timeout=0 if decoding else timeout, linger=not decoding)
        if batch is not None:
            self._serve_batch(batch)
        if self._decoding:
            self._decode_step()
        return batch is not None or decoding

    def _serve_pending(self) -> None:
        """Everything queued, and every stream to its end."""
        while self._serve_round(0):
            pass

    def _give_up(self, exc: CicadaError, code: int) -> int:
        """Stop for good: answer what is queued (UNAVAILABLE: the coordinator gives it
        another chance), DISCONNECT, and return the exit code."""
        (log.error if code else log.info)("giving up: %s", exc)
        self._fail(exc)
        self.built.set()
        self.runtime.drain()
        while not self.runtime.join(0.05):
            self._serve_pending()
        self._serve_pending()
        # A failed load's threads end by themselves: let them before the process exits, where
        # one still inside a torch op would abort it instead of exiting with `code`.
        if self.cold.error is not None and not self.cold.join_loader(LOADER_EXIT_WAIT_S):
            log.warning("the failed load's threads did not end within %.0f s; exiting anyway",
                        LOADER_EXIT_WAIT_S)  # fmt: skip
        return code


def _stopped(dispatch: Dispatch, exc: BaseException) -> Result:
    """The answer to a request the worker stopped under (a BaseException)."""
    return Result(
        id=dispatch.id,
        status=Status.FAILED,
        error=f"the worker stopped while running it ({type(exc).__name__})",
    )


def _exit_code(error: CicadaError) -> int:
    """The exit code of a worker that failed with `error`."""
    return EXIT_DEVICE_FAILED if isinstance(error, DeviceError) else EXIT_LOAD_FAILED


def _batch_policy(package: dict[str, Any], given: dict[str, Any]) -> BatchPolicy:
    """The settings given (config, options) over the package's defaults; a package's preferred
    sizes above a max_batch_size given in their place are dropped, not an error."""
    settings = {**package, **given}
    if "max_batch_size" in given and "preferred_batch_sizes" not in given:
        top = given["max_batch_size"]
        settings["preferred_batch_sizes"] = [
            n for n in package.get("preferred_batch_sizes", ()) if n <= top
        ]
    return BatchPolicy.of(settings)


def _load_factor() -> float:
    """How much slower than idle this machine runs now: runnable processes per core (at
    least 1), from the 1-minute load average where the system has one."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def _left(expected_s: float, spent_s: float) -> float:
    """What is left of a step expected to take `expected_s`; once it overran, a quarter of the
    time spent so far (the estimate was wrong: grow it rather than report zero)."""
    return max(expected_s - spent_s, 0.25 * spent_s)
