"""The runtime shared by edge agents and cloud workers: register, heartbeat, run dispatches.

One I/O thread owns the DEALER socket (ZeroMQ sockets are not thread-safe); dispatches run on
a pool of `capacity` executor threads, which hand results back through a queue and wake the
I/O thread through a pipe. So a busy worker keeps heartbeating, and a loading worker reports
its residency progress the moment it changes (`notify()`).

Liveness: the coordinator is presumed dead after `liveness` heartbeat intervals of silence;
the runtime then reconnects with a fresh socket and registers again (READY). A DISCONNECT
from the coordinator ("unknown peer", e.g. after it restarted, or after it dropped this worker
as silent) triggers the same. READY means "I hold nothing of yours": every dispatch running
when the runtime registers again is abandoned (cancelled, and its PARTIALs and RESULT are
never sent), so no attempt the coordinator has re-routed keeps streaming.

Every dispatch accepted ends in one RESULT, whatever the handler raises (FAILED). Should the
I/O thread itself die, `error` says why and `stopped` is set: the worker must then exit (it can
no longer answer anything), never linger registered. A READY the coordinator refuses (DISCONNECT
with `refused`: a field out of bounds, or a role or model this key is not bound to) ends the
runtime the same way, with `error` a `RegistrationRefused`: registering again would be refused
again, so the worker exits non-zero instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from cicada.common.defaults import HEARTBEAT_INTERVAL_S, LIVENESS, MAX_NEW_TOKENS
from cicada.common.errors import RegistrationRefused
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    MAX_ESTIMATE_S,
    Cancel,
    Disconnect,
    Dispatch,
    Heartbeat,
    Message,
    Partial,
    ProtocolError,
    Ready,
    Result,
    Role,
    Status,
    Tokens,
    WorkerState,
    decode,
    encode,
)
from cicada.common.sockets import CurveKeys, apply_curve_client, configure

log = logging.getLogger("cicada.worker")

EXIT_REFUSED = 5  # the coordinator refused the registration: the process exits with this


class Stream:
    """A running dispatch's way to send PARTIAL pieces before its RESULT, and to learn that
    the coordinator cancelled it. Thread-safe; pieces go out in order, before the RESULT."""

    def __init__(self, dispatch_id: str, runtime: WorkerRuntime) -> None:
        self.dispatch_id = dispatch_id
        self._runtime = runtime
        self._cancelled = threading.Event()
        self._seq = 0
        # TOKENS for this dispatch (section 12): position -> token, newest wins. Bounded by
        # MAX_NEW_TOKENS positions (the protocol's bound on a position).
        self._tokens: dict[int, int] = {}
        self._tokens_changed = threading.Condition()
        self.tokens_heard = 0  # TOKENS messages received (a drafting edge's sign of life)

    def send(self, outputs: list[np.ndarray], position: int | None = None) -> None:
        self._runtime._outgoing.put(
            Partial(id=self.dispatch_id, seq=self._seq, outputs=outputs, position=position)
        )
        self._seq += 1
        self._runtime._wake(b"r")

    def offer(self, position: int, tokens: list[int]) -> None:
        """TOKENS from the coordinator (the I/O thread): kept by position for the handler."""
        with self._tokens_changed:
            for i, token in enumerate(tokens):
                if position + i <= MAX_NEW_TOKENS:
                    self._tokens[position + i] = token
            self.tokens_heard += 1
            self._tokens_changed.notify_all()

    def tokens_from(self, position: int, n: int, wait_s: float = 0.0) -> list[int]:
        """Up to `n` consecutive tokens offered for position, position + 1, ...; waits up to
        `wait_s` for all `n` to be there. Positions before `position` are forgotten."""
        end = time.monotonic() + wait_s
        with self._tokens_changed:
            for stale in [p for p in self._tokens if p < position]:
                del self._tokens[stale]
            while True:
                out: list[int] = []
                while len(out) < n and position + len(out) in self._tokens:
                    out.append(self._tokens[position + len(out)])
                left = end - time.monotonic()
                if len(out) >= n or left <= 0 or self.cancelled:
                    return out
                self._tokens_changed.wait(left)

    def forget_from(self, position: int) -> None:
        """Forget the tokens offered for `position` and after (drafts made after a token that
        did not stand)."""
        with self._tokens_changed:
            for stale in [p for p in self._tokens if p >= position]:
                del self._tokens[stale]

    def wait_tokens(self, heard: int, timeout: float) -> None:
        """Wait up to `timeout` for a TOKENS message beyond the `heard`-th."""
        with self._tokens_changed:
            if self.tokens_heard == heard and not self.cancelled:
                self._tokens_changed.wait(timeout)

    def offered(self) -> dict[int, int]:
        with self._tokens_changed:
            return dict(self._tokens)

    def verdict(self, accepted: int) -> None:
        """An exact takeover's first PARTIAL: how many tokens of the draft stand."""
        self._runtime._outgoing.put(
            Partial(id=self.dispatch_id, seq=self._seq, outputs=[], accepted=accepted)
        )
        self._seq += 1
        self._runtime._wake(b"r")

    def cancel(self) -> None:
        self._cancelled.set()
        with self._tokens_changed:
            self._tokens_changed.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


# (dispatch, monotonic deadline, its stream) -> result
Handler = Callable[[Dispatch, float | None, Stream], Result]


@dataclass
class WorkerStatus:
    """What the worker reports in READY and HEARTBEAT."""

    state: WorkerState = WorkerState.READY
    resident_stages: int = 0
    total_stages: int = 0
    eta_s: float | None = None
    compute_s: float | None = None
    # A starting cloud worker's phase (protocol.PHASES), seconds in it so far, and its weights
    # read and verified so far (which run ahead of the stages resident).
    phase: str | None = None
    phase_s: float | None = None
    read_stages: int = 0
    read_bytes: int = 0
    total_bytes: int = 0
    # A batching worker's fitted cost model (cloud/batching.py BatchCost): with it, `compute_s`
    # is its own fit of a batch of one, and is reported instead of the runtime's average.
    batch_marginal: float | None = None


@dataclass
class RuntimeConfig:
    address: str
    role: Role
    worker: str
    models: list[str]
    variant: str = ""
    capacity: int = 1
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    liveness: int = LIVENESS
    curve: CurveKeys | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    drafts: bool | None = None  # READY's `drafts` (section 12)


class WorkerRuntime:
    def __init__(
        self,
        config: RuntimeConfig,
        handler: Handler,
        status: Callable[[], WorkerStatus] = WorkerStatus,
        load: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.status = status
        self.load = load or (lambda: 0.0)
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.registered = threading.Event()
        self.registrations = 0  # how many READYs were sent (re-registrations included)
        self.error: BaseException | None = None  # why the I/O thread died, if it did
        # RESULTs and PARTIALs, in the order they are to be sent.
        self._outgoing: queue.Queue[Result | Partial] = queue.Queue()
        self._streams: dict[str, Stream] = {}
        self._abandoned: set[str] = set()  # dispatches given up at a re-registration
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._inflight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.capacity, thread_name_prefix="cicada-exec")
        self._thread = threading.Thread(target=self._loop, name="cicada-io", daemon=True)
        self._compute_ema: float | None = None
        self._compute_from_warmup = False  # the estimate is the warm-up forward's time

    # -- public -----------------------------------------------------------------------------

    def start(self) -> WorkerRuntime:
        self._thread.start()
        return self

    def notify(self) -> None:
        """Send a heartbeat now (state or residency changed)."""
        self._wake(b"h")

    def drain(self) -> None:
        """Take nothing new, finish what is running, say DISCONNECT, stop."""
        self.draining.set()
        self._wake(b"d")

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def compute_estimate(self) -> float | None:
        return self._compute_ema

    # -- internals --------------------------------------------------------------------------

    def _wake(self, what: bytes) -> None:
        with contextlib.suppress(OSError):  # the pipe is closed at shutdown
            os.write(self._wake_w, what)

    def _connect(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        configure(sock)
        apply_curve_client(sock, self.config.curve)
        sock.connect(self.config.address)
        self._send(sock, self._ready())
        self.registrations += 1
        return sock

    def _ready(self) -> Ready:
        return Ready(
            role=self.config.role,
            worker=self.config.worker,
            models=list(self.config.models),
            variant=self.config.variant,
            capacity=self.config.capacity,
            drafts=self.config.drafts,
            **self._report(self.status()),
        )

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(inflight=self._inflight, load=self.load(), **self._report(self.status()))

    def _report(self, s: WorkerStatus) -> dict[str, Any]:
        """The fields READY and HEARTBEAT share: state, residency, estimates, phase."""
        return {
            "state": WorkerState.DRAINING if self.draining.is_set() else s.state,
            "resident_stages": s.resident_stages,
            "total_stages": s.total_stages,
            "eta_s": _estimate(s.eta_s),
            "compute_s": _estimate(
                s.compute_s
                if self._compute_ema is None or s.batch_marginal is not None
                else self._compute_ema
            ),
            "batch_marginal": s.batch_marginal,
            "phase": s.phase,
            "phase_s": _estimate(s.phase_s),
            "read_stages": s.read_stages,
            "read_bytes": s.read_bytes,
            "total_bytes": s.total_bytes,
        }

    @staticmethod
    def _send(sock: zmq.Socket[bytes], message: Message) -> bool:
        """Never block the I/O thread: with no connection (e.g. a CURVE handshake that was
        refused) a blocking send would hang it for good. A heartbeat that cannot go is simply
        dropped; liveness then reconnects."""
        try:
            sock.send_multipart(encode(message), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _loop(self) -> None:
        try:
            self._serve()
        except RegistrationRefused as exc:
            log.error("%s; exiting", exc)
            self.error = exc
        except BaseException as exc:
            log.exception("the worker's I/O thread died")
            self.error = exc
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.stopped.set()

    def _serve(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        interval = self.config.heartbeat_interval
        sock = self._connect(ctx)
        poller = self._poller(sock)
        heard = time.monotonic()
        next_beat = heard + interval
        try:
            while True:
                timeout = max(0.0, next_beat - time.monotonic())
                events = dict(poller.poll(int(timeout * 1000)))
                now = time.monotonic()
                if sock in events:
                    while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                        frames = sock.recv_multipart(copy=True)
                        heard = now
                        if self._on_message(sock, frames):
                            self._abandon()
                            self._send(sock, self._ready())
                            self.registrations += 1
                if self._wake_r in events:
                    try:
                        wakes = os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        wakes = b""
                    if b"h" in wakes or b"d" in wakes:  # state changed: say so now
                        self._send(sock, self._heartbeat())
                        next_beat = now + interval
                self._flush_results(sock)
                if self.draining.is_set() and self._inflight == 0 and self._outgoing.empty():
                    self._send(sock, Disconnect(reason="draining"))
                    return
                if now >= next_beat:
                    self._send(sock, self._heartbeat())
                    next_beat = now + interval
                if now - heard > interval * self.config.liveness:
                    # The coordinator is gone or restarted: reconnect and register again.
                    log.warning("coordinator silent for %.1f s: reconnecting", now - heard)
                    self._abandon()
                    sock.close(linger=0)
                    sock = self._connect(ctx)
                    poller = self._poller(sock)
                    heard = now
        finally:
            sock.close(linger=0)

    def _abandon(self) -> None:
        """Before registering again: cancel every running dispatch and drop what it has sent
        or will send (its PARTIALs and RESULT belong to a registration that is over)."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.cancel()
            self._abandoned.add(stream.dispatch_id)
        if streams:
            log.warning("registering again: %d running dispatches abandoned", len(streams))
        # Pieces and results already waiting to go are the old registration's too.
        with self._outgoing.mutex:
            waiting = list(self._outgoing.queue)
        for message in waiting:
            self._abandoned.add(message.id)

    def _poller(self, sock: zmq.Socket[bytes]) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        return poller

    def _on_message(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
        """Handle one message; True means 'register again'."""
        try:
            message = decode(frames, DEFAULT_LIMITS)
        except ProtocolError as exc:
            log.warning("dropping malformed message from the coordinator: %s", exc)
            return False
        if isinstance(message, Disconnect):
            if message.refused:
                raise RegistrationRefused(message.refused, message.reason)
            return True
        if isinstance(message, Heartbeat):
            self.registered.set()
            return False
        if isinstance(message, Dispatch):
            self.registered.set()
            self._accept(sock, message)
        if isinstance(message, Cancel):
            with self._lock:
                stream = self._streams.get(message.id)
            if stream is not None:
                stream.cancel()
        if isinstance(message, Tokens):
            with self._lock:
                stream = self._streams.get(message.id)
            # Kept under the dispatch id they name: a TOKENS for anything else is dropped.
            position = message.position
            if stream is not None and isinstance(position, int) and 0 <= position <= MAX_NEW_TOKENS:
                stream.offer(position, list(message.tokens or ()))
        return False

    def _accept(self, sock: zmq.Socket[bytes], dispatch: Dispatch) -> None:
        if self.draining.is_set():
            self._send(
                sock, Result(id=dispatch.id, status=Status.UNAVAILABLE, error="worker is draining")
            )
            return
        deadline = None
        if dispatch.timeout_ms is not None:
            if dispatch.timeout_ms <= 0:
                self._send(
                    sock,
                    Result(
                        id=dispatch.id,
                        status=Status.TIMEOUT,
                        error="deadline passed before the worker got it",
                    ),
                )
                return
            deadline = time.monotonic() + dispatch.timeout_ms / 1000
        stream = Stream(dispatch.id, self)
        with self._lock:
            self._inflight += 1
            self._streams[dispatch.id] = stream
        self._pool.submit(self._execute, dispatch, deadline, stream)

    def _execute(self, dispatch: Dispatch, deadline: float | None, stream: Stream) -> None:
        start = time.monotonic()
        try:
            if deadline is not None and start >= deadline:
                result = Result(
                    id=dispatch.id,
                    status=Status.TIMEOUT,
                    error="deadline passed before the worker could start it (queued here)",
                )
            else:
                result = self.handler(dispatch, deadline, stream)
        except BaseException as exc:  # the model raised: report, keep serving
            log.exception("request %s failed", dispatch.id)
            result = Result(
                id=dispatch.id, status=Status.FAILED, error=f"{type(exc).__name__}: {exc}"
            )
        elapsed = time.monotonic() - start
        compute = result.timings.setdefault("compute_s", elapsed)
        # A forward that waited for weights (cold start) says nothing about steady-state
        # compute; letting it in made the coordinator think the cloud was seconds slow.
        # A generation's time is per token count, not per request: it says nothing either;
        # nor does a worker's first forward once loaded (`warmup`: first touch of the weights).
        # The warm-up stands in until the first steady forward replaces it (not averaged in).
        timings = result.timings
        steady = not (timings.get("during_load") or timings.get("warmup") or "tokens" in timings)
        if result.status is Status.OK and steady:
            ema = None if self._compute_from_warmup else self._compute_ema
            self._compute_ema = compute if ema is None else 0.8 * ema + 0.2 * compute
            self._compute_from_warmup = False
        elif result.status is Status.OK and timings.get("warmup") and self._compute_ema is None:
            self._compute_ema, self._compute_from_warmup = compute, True
        result.variant = result.variant or self.config.variant
        with self._lock:
            self._streams.pop(dispatch.id, None)
        self._outgoing.put(result)
        self._wake(b"r")

    def _flush_results(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                message = self._outgoing.queue[0]  # peek: order must survive a failed send
            except IndexError:
                return
            abandoned = message.id in self._abandoned
            if not abandoned and not self._send(sock, message):
                return  # keep it for the next round rather than lose an outcome
            self._outgoing.get_nowait()
            if isinstance(message, Result):
                self._abandoned.discard(message.id)
                with self._lock:
                    self._inflight -= 1


def _estimate(value: float | None) -> float | None:
    """A seconds estimate as the protocol takes it: finite, 0 ... MAX_ESTIMATE_S (an unknown
    one, e.g. a load rate of zero so far, travels as nil)."""
    if value is None or not math.isfinite(value):
        return None
    return min(max(0.0, value), MAX_ESTIMATE_S)
