"""A simulated CUDA device on CPU, for the CUDA stage source's tests and the CPU dry run of
`benchmarks/gpu_check.py`.

It behaves like `CudaBackend` (cloud/loading/cuda.py) in what the loader depends on: a copy is
*enqueued* on a stream and completes later, in stream order; an event recorded on a stream
completes once every copy enqueued before it has; `event.synchronize()` blocks until then.
With `hold=True` no copy completes until `release()` is called, which is how a test shows that
residency is not announced while copies are only queued. Copies read their source when they
complete, as a DMA engine reads pinned memory, so a ring buffer reused too early would show.

Failures can be injected: `fail_copy=n` raises on the n-th enqueued copy (a size mismatch, a
CUDA launch error), `fail_sync` is raised by the first event synchronisation (an asynchronous
CUDA error surfacing late). No wait is unbounded: a synchronisation that would block longer
than `timeout` raises `TimeoutError` (a simulated hang, reported, never waited out).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class SimulatedStream:
    def __init__(self) -> None:
        self.pending: deque[Callable[[], object]] = deque()  # enqueued, not yet run, in order
        self.enqueued = 0  # copies ever enqueued
        self.completed = 0  # how many of them have run (then they are dropped, as on a GPU)


class SimulatedEvent:
    def __init__(self, device: SimulatedCuda) -> None:
        self.device = device
        self.stream: SimulatedStream | None = None
        self.position = 0  # completes once this many copies of `stream` have

    def done(self) -> bool:
        """Whether every copy recorded before it has completed (caller holds the lock)."""
        return self.stream is None or self.stream.completed >= self.position

    def query(self) -> bool:
        with self.device.cond:
            return self.done()

    def synchronize(self) -> None:
        self.device.wait_for(self)


class SimulatedCuda:
    """A `CudaBackend` stand-in on CPU (construct one, pass it as `backend=lambda _: sim`)."""

    def __init__(
        self,
        *,
        hold: bool = False,
        fail_copy: int | None = None,
        fail_sync: BaseException | None = None,
        timeout: float = 60.0,
    ) -> None:
        import torch

        self.torch = torch
        self.cond = threading.Condition()
        self.held = hold
        self.fail_copy = fail_copy
        self.fail_sync = fail_sync
        self.timeout = timeout
        self.streams: list[SimulatedStream] = []
        self.copies = 0  # enqueued so far
        self.waited: list[SimulatedEvent] = []  # events the compute stream waited on
        self.pinned_buffers: list[torch.Tensor] = []  # registered and not unregistered yet
        self.ever_pinned = 0
        self.unpinned = 0

    # -- what the loader calls (CudaBackend's interface) -----------------------------------

    def stream(self) -> SimulatedStream:
        s = SimulatedStream()
        self.streams.append(s)
        return s

    def event(self) -> SimulatedEvent:
        return SimulatedEvent(self)

    def pin(self, host: torch.Tensor) -> None:
        self.pinned_buffers.append(host)
        self.ever_pinned += 1

    def unpin(self, host: torch.Tensor) -> None:
        self.pinned_buffers = [b for b in self.pinned_buffers if b is not host]
        self.unpinned += 1

    def empty(self, nbytes: int) -> torch.Tensor:
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def copy(self, stream: SimulatedStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self.cond:
            self.copies += 1
            if self.fail_copy is not None and self.copies == self.fail_copy:
                raise RuntimeError("simulated: the copy failed (size mismatch)")
            stream.pending.append(lambda: dst.copy_(src))
            stream.enqueued += 1
            if not self.held:
                self._complete(stream)
            self.cond.notify_all()

    def record(self, event: SimulatedEvent, stream: SimulatedStream) -> None:
        with self.cond:
            event.stream, event.position = stream, stream.enqueued

    def wait(self, event: SimulatedEvent) -> None:
        """Compute runs on the host here: waiting on the device is waiting for the event."""
        self.waited.append(event)
        event.synchronize()

    def synchronize(self) -> None:
        pass  # compute ran synchronously on the CPU

    # -- what a test drives ----------------------------------------------------------------

    def release(self) -> None:
        """Let every queued copy complete, and every later one at once."""
        with self.cond:
            self.held = False
            for stream in self.streams:
                self._complete(stream)
            self.cond.notify_all()

    def wait_queued(self, copies: int) -> None:
        """Wait until `copies` copies have been enqueued (bounded by `timeout`)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.copies >= copies, self.timeout):
                raise TimeoutError(f"simulated: {self.copies} copies queued, not {copies}")

    # -- internals -------------------------------------------------------------------------

    def _complete(self, stream: SimulatedStream) -> None:
        with self.torch.inference_mode():  # a DMA engine knows no autograd, whoever releases
            while stream.pending:
                stream.pending.popleft()()
                stream.completed += 1

    def wait_for(self, event: SimulatedEvent) -> None:
        with self.cond:
            if self.fail_sync is not None:
                exc, self.fail_sync = self.fail_sync, None
                raise exc
            if not self.cond.wait_for(event.done, self.timeout):
                raise TimeoutError("simulated: an event did not complete (copies held)")
