"""What every benchmark reports about the machine it ran on, in one place."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The repository root: where results/ go by default and where `git rev-parse` runs.
ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions(dists: Iterable[str]) -> dict[str, str]:
    """The installed version of each distribution in `dists` that is installed."""
    found: dict[str, str] = {}
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def _proc_field(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.partition(":")[2].strip()
    return None


def git_head() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return None


def machine_info(dists: Iterable[str] = ()) -> dict[str, Any]:
    """CPU count and model, kernel, platform, Python, memory, the date (UTC), the commit, and
    the versions of `dists` (under "versions", when any are asked for)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if (model := _proc_field("/proc/cpuinfo", "model name")) is not None:
        info["cpu_model"] = model
    if (total := _proc_field("/proc/meminfo", "MemTotal")) is not None:
        with contextlib.suppress(ValueError, IndexError):
            info["memory_bytes"] = int(total.split()[0]) * 1024
    dists = tuple(dists)
    if dists:
        info["versions"] = versions(dists)
    if (head := git_head()) is not None:
        info["git_head"] = head
    return info
