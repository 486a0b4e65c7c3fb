"""The cyclic garbage collector during a cold start: kept out of the critical path, and watched.

`import torch` leaves ~10^5 container objects behind. With the collector on, a full
(generation-2) collection walks all of them, 50-70 ms here, and one is due right where
construction allocates its modules: it landed inside the construct span of 3 runs out of 3.
Earlier ones fired inside the import too (25-35 ms each). Neither frees anything worth it (an
import and a constructor make few cycles), so:

* `quiet_import()`: the collector is off during the import, and what the import made is frozen
  afterwards (`gc.freeze()`: moved to the permanent generation, never walked again; O(1));
* `paused()`: the collector is off during construction and back as it was afterwards.

`record_collections(timeline)` puts every collection on the timeline's "gc" lane (label
"gen0".."gen2"), so where they land is measured rather than guessed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cicada.cloud.timeline import Timeline

GC_LANE = "gc"


@contextmanager
def paused() -> Iterator[None]:
    """The collector off for the block (nested blocks are fine), then as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def quiet_import() -> Iterator[None]:
    """`paused()`, then freeze what the block created: long-lived module objects that a later
    full collection would otherwise walk again and again."""
    with paused():
        yield
        gc.freeze()


def record_collections(timeline: Timeline) -> Callable[[], None]:
    """Record each collection as a span on the "gc" lane; returns the function that stops it."""
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        now = timeline.now()
        if phase == "start":
            started["t"] = now
        else:
            timeline.add(GC_LANE, f"gen{info.get('generation')}", started.get("t", now), now)

    gc.callbacks.append(on_gc)

    def stop() -> None:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)

    return stop


def full_collections(timeline: Timeline) -> list[tuple[float, float]]:
    """(start, end) of every generation-2 collection recorded on `timeline`."""
    return [(s.start, s.end) for s in timeline.spans if s.lane == GC_LANE and s.label == "gen2"]
