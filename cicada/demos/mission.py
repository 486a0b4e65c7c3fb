"""What `cicada demo` must show, computed from its records: where each request went, the share
of the quality-seeking requests sent after the cloud was ready that the cloud served, whether
every latency-critical request was answered by the edge in time, and the cloud worker's
start-up as the coordinator saw it (phase, weights read, stages resident, ETA)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cicada.common.protocol import PHASES
from cicada.demos.trace import QUALITY, Outcome

# How the live line names a phase (protocol.PHASES), and the one before the first report.
LAUNCHING = "launching"
PHASE_TEXT = {
    LAUNCHING: "process starting",
    "importing": "importing torch",
    "constructing": "constructing the model",
    "loading": "loading weights",
    "ready": "ready",
}


@dataclass(frozen=True)
class Frame:
    """The cloud worker's start-up at one moment, as shown (and kept for --json)."""

    t: float  # seconds since its launch
    phase: str  # LAUNCHING, or one of protocol.PHASES (or a newer worker's word)
    phase_s: float  # seconds in that phase so far
    state: str
    resident_stages: int
    read_stages: int
    total_stages: int
    read_bytes: int
    total_bytes: int
    eta_s: float | None

    def describe(self) -> str:
        """One line: phase and its elapsed time, weights read, ETA."""
        text = f"{PHASE_TEXT.get(self.phase, self.phase)} ({self.phase_s:.1f} s)"
        if self.phase != "ready" and self.total_bytes:
            text += (
                f" · weights read {self.read_stages}/{self.total_stages} stages "
                f"({self.read_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB)"
            )
        if self.phase != "ready" and self.eta_s is not None:
            text += f" · ready in ~{self.eta_s:.1f} s"
        return text


def launching_frame(t: float, total_stages: int, total_bytes: int) -> Frame:
    """Before the worker's first report: what the package says it will load."""
    return Frame(t, LAUNCHING, t, "launching", 0, 0, total_stages, 0, total_bytes, None)


def frame_from(snapshot: dict[str, Any], worker: str, t: float, total_stages: int) -> Frame | None:
    """The worker's frame in a `cicada status` snapshot; None until it has reported."""
    entry = snapshot["residency"].get(worker)
    if entry is None or "phase" not in entry:
        return None
    states = [w["state"] for w in snapshot["workers"] if w["role"] == entry["role"]]
    eta = entry.get("eta_seconds", -1.0)
    return Frame(
        t=t,
        phase=str(entry["phase"]),
        phase_s=float(entry.get("phase_seconds", 0.0)),
        state=states[0] if states else "?",
        resident_stages=int(entry.get("resident_stages", 0)),
        read_stages=int(entry.get("read_stages", 0)),
        total_stages=int(entry.get("total_stages", 0)) or total_stages,
        read_bytes=int(entry.get("read_bytes", 0)),
        total_bytes=int(entry.get("total_bytes", 0)),
        eta_s=eta if eta >= 0 else None,
    )


def phases_in_order(frames: Iterable[Frame]) -> bool:
    """Each phase comes once, in protocol order (a phase may be too short to be seen)."""
    rank = {p: i for i, p in enumerate((LAUNCHING, *PHASES))}
    seen = [rank[f.phase] for f in frames if f.phase in rank]
    return all(a <= b for a, b in itertools.pairwise(seen))


def quality_after_ready(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    """Of the quality-seeking requests sent after the demo saw the cloud ready, how many the
    cloud served (the others: the edge, or an error)."""
    sent = [o for o in outcomes if o.priority == QUALITY and o.after_ready]
    cloud = sum(o.status == "OK" and o.served_by == "cloud" for o in sent)
    return {
        "sent": len(sent),
        "cloud": cloud,
        "edge": sum(o.status == "OK" and o.served_by == "edge" for o in sent),
        "share": cloud / len(sent) if sent else None,
    }


def critical_on_time(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """The latency-critical requests, and how many the edge answered inside their deadline."""
    critical = [o for o in outcomes if o.priority == 0]
    return {
        "sent": len(critical),
        "edge_in_time": sum(o.served_by == "edge" and o.met_deadline for o in critical),
    }


def cache_summary(cache: Path) -> dict[str, Any]:
    """Where the packages and edge models are kept, and their size on disk."""
    total = 0
    for root, _, files in os.walk(cache):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return {"path": str(cache), "bytes": total}


def frames_json(frames: Iterable[Frame]) -> list[dict[str, Any]]:
    return [asdict(f) for f in frames]
