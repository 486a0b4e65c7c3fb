"""The demo's trace: a burst of mixed-priority requests through the SDK, sized to the hardware.

Requests arrive as a Poisson process at the burst's rate, their priorities drawn from `MIX`.
While the cloud worker is cold the edge answers them. Once it is ready, the quality-seeking
requests go through a pacer: once the quality-seeking work sent while the cloud was cold has
been answered (a loading cloud worker may have taken it), one at a time (the next once the
previous is answered), at least `PACE` times the cloud's latest forward time apart, as measured
from its own replies (`compute_s`). A CPU cloud worker runs
one forward at a time, and on this 2-core machine that forward takes 0.2 s idle and seconds
when the machine is busy: a burst that sent quality-seeking work faster than that would only
show the policy (rightly) moving it to the edge. The demo says what pace it used. The last few
quality-seeking requests wait for the cloud to be ready (a bounded wait), so that every run
shows some of them sent after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# priority -> (share of the burst, deadline in seconds)
MIX = {0: (0.3, 1.0), 1: (0.5, 3.0), 2: (0.2, 8.0)}
PRIORITY_NAMES = {0: "critical", 1: "normal", 2: "quality"}
QUALITY = 2
HOLD_FOR_CLOUD_S = 120.0  # the most a held request waits for the cloud to be ready
QUALITY_AFTER_READY = 4  # at least this many quality-seeking requests are sent after ready
PACE = 1.25  # quality-seeking requests after ready: one per PACE x the cloud's forward time
UNMEASURED_GAP_S = 1.0  # until a forward was measured (bounded by the wait for a measurement)

RequestFor = Callable[[int], dict[str, Any]]  # request index -> Client.invoke keyword arguments


@dataclass
class Outcome:
    id: int
    priority: int
    deadline_s: float
    sent_at: float
    latency_s: float
    status: str
    served_by: str
    variant: str
    error: str = ""
    # The latest it can have been dispatched to the worker that answered (seconds since the
    # burst's time zero): received minus the coordinator's worker_s. None: not dispatched.
    dispatched_by_s: float | None = None
    # Whether the demo had seen the cloud worker ready when it sent this request.
    after_ready: bool = False

    @property
    def met_deadline(self) -> bool:
        return self.status == "OK" and self.latency_s <= self.deadline_s


@dataclass
class Pacer:
    """Sends the quality-seeking requests after the cloud is ready one at a time, PACE x its
    latest forward time (a reply outside its load) apart, after the cold start's quality work
    is done: what one CPU worker that runs one forward at a time can carry."""

    forward_s: float | None = None
    gaps: list[float] = field(default_factory=list)
    cold_outstanding: int = 0  # quality-seeking requests sent before ready, not answered yet
    _last: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _measured: asyncio.Event = field(default_factory=asyncio.Event)
    _paced_outstanding: bool = False

    def measure(self, seconds: float) -> None:
        self.forward_s = seconds
        self._measured.set()

    async def turn(self, wait_s: float) -> None:
        """Wait for this request's turn (at most about `wait_s` for each thing it waits on)."""
        async with self._lock:
            until = time.monotonic() + wait_s
            # The cloud may still run those sent while it was cold, or the previous one.
            while (self.cold_outstanding or self._paced_outstanding) and time.monotonic() < until:
                await asyncio.sleep(0.05)
            if self._last is not None:
                if self.forward_s is None:  # the first answer tells the pace
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._measured.wait(), wait_s)
                gap = PACE * self.forward_s if self.forward_s else UNMEASURED_GAP_S
                self.gaps.append(gap)
                await asyncio.sleep(max(0.0, self._last + gap - time.monotonic()))
            self._last = time.monotonic()
            self._paced_outstanding = True

    def answered(self) -> None:
        """The request that had the last turn was answered."""
        self._paced_outstanding = False


def draw_priorities(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.choices(list(MIX), weights=[m[0] for m in MIX.values()], k=count)


def schedule(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from time zero)."""
    rng = random.Random(seed + 1)
    at, times = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        times.append(at)
    return times


async def burst(
    address: str,
    request_for: RequestFor,
    count: int,
    rate: float,
    seed: int,
    outcomes: list[Outcome],
    t0: float,
    outputs: dict[int, list[Any]],
    cloud_ready: threading.Event,
    pacer: Pacer,
) -> None:
    from cicada import AsyncClient, CallError

    priorities = draw_priorities(count, seed)
    quality = [i for i, p in enumerate(priorities) if p == QUALITY]
    held = set(quality[-QUALITY_AFTER_READY:])  # these wait for the cloud to be ready

    async def one(i: int, priority: int, at: float, client: Any) -> None:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        if i in held:
            await asyncio.to_thread(cloud_ready.wait, HOLD_FOR_CLOUD_S)
        deadline = MIX[priority][1]
        after_ready = cloud_ready.is_set()
        cold_quality = priority == QUALITY and not after_ready
        paced = priority == QUALITY and after_ready
        if paced:
            await pacer.turn(deadline)
        sent = time.monotonic()
        pacer.cold_outstanding += cold_quality
        try:
            result = await client.invoke(
                "demo", priority=priority, deadline=deadline, **request_for(i)
            )
        except CallError as exc:
            pacer.cold_outstanding -= cold_quality
            if paced:
                pacer.answered()
            status = getattr(exc, "status", None)
            outcomes.append(
                Outcome(
                    i,
                    priority,
                    deadline,
                    sent - t0,
                    time.monotonic() - sent,
                    getattr(status, "value", type(exc).__name__),
                    "-",
                    "",
                    str(exc)[:80],
                    after_ready=after_ready,
                )
            )
            return
        received = time.monotonic()
        pacer.cold_outstanding -= cold_quality
        if paced:
            pacer.answered()
        outputs[i] = result.outputs
        role = result.served_by.get("role", "?")
        timings = result.timings
        if role == "cloud" and "compute_s" in timings and not timings.get("worker_during_load"):
            # (the worker's first forward once loaded, `worker_warmup`, counts: the latest
            # forward sets the pace, and the next one corrects it)
            pacer.measure(float(timings["compute_s"]))
        outcomes.append(
            Outcome(
                i,
                priority,
                deadline,
                sent - t0,
                received - sent,
                "OK",
                role,
                result.served_by.get("variant", ""),
                dispatched_by_s=received - timings.get("worker_s", 0.0) - t0,
                after_ready=after_ready,
            )
        )

    times = schedule(count, rate, seed)
    async with AsyncClient(address, timeout=30.0) as client:
        await asyncio.gather(
            *(one(i, p, t, client) for i, (p, t) in enumerate(zip(priorities, times, strict=True)))
        )
