"""Spans on named lanes, for timing breakdowns and Gantt charts. Torch-free.

Times are seconds since the process was launched: the launcher may pass its wall-clock launch
time in CICADA_LAUNCH_TIME so that process start-up is counted; otherwise the process's own
creation time (psutil, 10 ms resolution) is used.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    lane: str  # "import", "construct", "read", "apply", "compute", "wait"
    label: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def launch_wall_time() -> float:
    env = os.environ.get("CICADA_LAUNCH_TIME")
    if env:
        try:
            return float(env)
        except ValueError:
            pass
    try:
        # Process age from /proc (clock ticks, 10 ms): psutil's create_time is only as exact as
        # the boot time in /proc/stat, which is whole seconds.
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux
        return time.time()


class Timeline:
    """Thread-safe recorder of spans; `now()` is seconds since launch."""

    def __init__(self, launch_wall: float | None = None) -> None:
        wall, perf = time.time(), time.perf_counter()
        launch = launch_wall_time() if launch_wall is None else launch_wall
        # perf_counter value that corresponds to the launch instant.
        self._origin = perf - (wall - launch)
        self.entered = perf - self._origin  # when this process reached our code
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def add(self, lane: str, label: str, start: float, end: float) -> None:
        with self._lock:
            self._spans.append(Span(lane, label, start, end))

    def mark(self, name: str) -> float:
        t = self.now()
        self.marks[name] = t
        return t

    def span(self, lane: str, label: str) -> _SpanContext:
        return _SpanContext(self, lane, label)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def lane_seconds(self, lane: str) -> float:
        return sum(s.seconds for s in self.spans if s.lane == lane)

    def busy_seconds(self, lane: str) -> float:
        """Union of a lane's spans (overlapping spans counted once)."""
        intervals = sorted((s.start, s.end) for s in self.spans if s.lane == lane)
        total, cur_start, cur_end = 0.0, None, None
        for start, end in intervals:
            if cur_end is None or start > cur_end:
                if cur_end is not None and cur_start is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_end is not None and cur_start is not None:
            total += cur_end - cur_start
        return total


class _SpanContext:
    def __init__(self, timeline: Timeline, lane: str, label: str) -> None:
        self.timeline, self.lane, self.label = timeline, lane, label
        self.start = 0.0

    def __enter__(self) -> _SpanContext:
        self.start = self.timeline.now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timeline.add(self.lane, self.label, self.start, self.timeline.now())
