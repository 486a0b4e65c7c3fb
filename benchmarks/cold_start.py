#!/usr/bin/env python3
"""Cold-start benchmark: model x strategy x page-cache state, each run a fresh process.

    python3 -m benchmarks.cold_start                      # gpt2-medium, every strategy, warm+cold
    python3 -m benchmarks.cold_start --quick              # gpt2-tiny, 2 runs, warm: a smoke test
    python3 -m benchmarks.cold_start --models gpt2-medium,bert-base --strategies cicada,meta \\
        --cache cold --runs 7 --out results/cold_start

Every run is `python3 -m cicada run PKG --input X --strategy S --timings T` launched with
CICADA_LAUNCH_TIME set just before the process is spawned, so process start-up is counted.
Before every cold run (and every floor sample of the cold state) memory is primed (this VM hands
freed memory back to its host, and touching it again costs ~2.4 s/GB: a few GB are allocated,
touched and freed), so that the weights read into the page cache and the model's own memory do
not pay the host's page faults. Warm runs are not primed by default: they need little new
memory, and the hand-back of a prime, ~2 s after the free, lands inside a run of 1.4–2 s and
stalls it (primed warm runs were slow exactly when 0.19–0.27 s of other CPU time, the kernel's,
fell in them; unprimed, no run had more than 0.06 s: BENCHMARKS.md, "Priming, A/B"). Before
every run and floor sample the page cache is put in the requested state: *warm* reads the
package's files once (and the warm block starts with one untimed start of every strategy, so
python, torch and the peer libraries are cached too); *cold* drops the page cache
(/proc/sys/vm/drop_caches where writable, else, or with --evict fadvise, posix_fadvise DONTNEED
on the package files after an fsync) and mincore(2) records how much of the weights was still
resident at launch. Repetitions interleave
strategies (run 1 of each, then run 2 ...; the order rotates) so that machine noise spreads
evenly. The launcher never imports torch and resets its own peak RSS before every spawn: Linux
carries a parent's peak RSS into the ru_maxrss of its children.

The floor is measured in the same run and the same cache state::

    floor = python start + torch import + file bytes / read bandwidth + last stage's compute

python start: wall time of `python3 -c pass`; torch import: `import torch` timed inside a fresh
process; read bandwidth: a sequential read of the weights file with 16 MiB `readinto` into one
reused buffer; last stage's compute: the cicada runs' `last_stage_compute_s`. All medians.

Writes <out>/results.json (every raw run, medians, floor, targets, machine) and
<out>/gantt-<model>-<cache>.png (the median run of each strategy, lane by lane).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT
from benchmarks.machine import machine_info as base_machine_info
from cicada.cloud.loading.registry import builtin_strategies, optional_libraries
from cicada.common.errors import CicadaError
from cicada.common.package import Manifest
from cicada.demos.cold_start import REFERENCE_MODELS, default_cache

# The strategies' registry (cloud/loading/registry.py); torch-free, like this process.
BASE_STRATEGIES = builtin_strategies()
PEER_LIBRARIES = optional_libraries()  # strategy -> (import name, pip distribution)
ALL_STRATEGIES = BASE_STRATEGIES + tuple(PEER_LIBRARIES)
CACHE_STATES = ("warm", "cold")
LANES = ("import", "construct", "read", "apply", "compute", "wait")
LANE_COLORS = {
    "import": "#9e9e9e",
    "construct": "#8e6bbf",
    "read": "#3b7dd8",
    "apply": "#e8a33d",
    "compute": "#3aa655",
    "wait": "#d9534f",
}
BREAKDOWN = ("import_s", "construct_s", "read_s", "apply_s", "compute_s", "wait_s")
UTILIZATION_DEFINITION = (
    "utilization = busy time of the I/O (read) and compute lanes, each lane's spans merged, "
    "/ (2 lanes x wall time from launch to first result)"
)
READ_CHUNK = 16 * 1024 * 1024
RSS_FACTOR = 1.15
NOT_COLD = 0.05  # a cold run that finds more of its weights cached than this is not counted
RUN_TIMEOUT_S = 600
GiB = 2**30

_TORCH_PROBE = (
    "import resource, sys, time\n"
    "t = time.perf_counter()\n"
    "import torch\n"
    "d = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(d, rss if sys.platform == 'darwin' else rss * 1024)\n"
)


# -- machine state ----------------------------------------------------------------------------


def prime_memory(gib: float) -> None:
    """Allocate, touch and free `gib` GiB so the next process finds the memory already ours.

    Done in a throwaway process: Linux carries the launching process's peak RSS into the
    ru_maxrss of every child it spawns (across fork and exec), so the launcher stays small.
    """
    if gib > 0:
        code = f"import numpy as np; block = np.ones({int(gib * GiB) // 8}); del block"
        subprocess.run([sys.executable, "-c", code], check=True)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (clear_refs 5, Linux >= 4.0).

    A child inherits its launcher's peak RSS in its own ru_maxrss (`cicada run` reports
    ru_maxrss), so the launcher resets its own before every spawn.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def own_rss() -> dict[str, int]:
    """This process's VmRSS and VmHWM in bytes (empty where /proc is not there)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


_libc: Any = None


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore); None where it cannot be asked."""
    global _libc
    try:
        size = path.stat().st_size
        if size == 0:
            return 1.0
        if _libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc = libc
        page = os.sysconf("SC_PAGE_SIZE")
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                return sum(1 for v in bytes(vec) if v & 1) / pages
            finally:
                _libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    except (OSError, AttributeError, ValueError):
        return None


def sequential_read(path: Path) -> tuple[int, float]:
    """Read the whole file with 16 MiB readinto into one reused buffer: (bytes, seconds)."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total, time.perf_counter() - start


class PageCache:
    """Puts files into the warm or cold page-cache state; remembers how it evicts."""

    def __init__(self, need_cold: bool = True, evict: str = "auto") -> None:
        # Probing drops the caches for real: only done when a cold state was asked for.
        if not need_cold:
            self.method = "not needed (warm only)"
        elif evict == "fadvise":
            self.method = "posix_fadvise" if hasattr(os, "posix_fadvise") else "none"
        else:
            self.method = self._probe()

    @staticmethod
    def _drop_caches() -> bool:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    @staticmethod
    def _fadvise(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def _probe(self) -> str:
        if self._drop_caches():
            return "drop_caches"
        if hasattr(os, "posix_fadvise"):
            return "posix_fadvise"
        return "none"

    def describe(self) -> str:
        return {
            "drop_caches": "sync + echo 3 > /proc/sys/vm/drop_caches before every cold run (the "
            "whole page cache: weights, python and torch libraries), plus posix_fadvise "
            "DONTNEED on the package files",
            "posix_fadvise": "fsync + posix_fadvise(POSIX_FADV_DONTNEED) on the package files "
            "before every cold run: only the weights are cold, python and torch libraries stay "
            "cached",
            "none": "no way to evict the page cache here: the COLD NUMBERS ARE WARM",
        }.get(self.method, "no cold runs were asked for")

    def warm(self, files: list[Path]) -> None:
        for path in files:
            sequential_read(path)

    def cold(self, files: list[Path]) -> None:
        if self.method == "drop_caches" and not self._drop_caches():
            self.method = "posix_fadvise"
        if self.method in ("drop_caches", "posix_fadvise"):
            for path in files:
                with contextlib.suppress(OSError):
                    self._fadvise(path)

    def prepare(self, state: str, files: list[Path]) -> None:
        if state == "warm":
            self.warm(files)
        else:
            self.cold(files)


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait: float, window: float = 0.5, busy_limit: float = 0.15) -> float:
    """Wait (at most `max_wait` s) until the machine has been idle for two windows in a row:
    other work on a 2-core machine skews a cold start more than anything we measure.
    Returns the seconds waited."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < max_wait:
        before = cpu_times()
        time.sleep(window)
        after = cpu_times()
        if before is None or after is None:
            return 0.0
        busy = (after[0] - before[0]) / max(after[1] - before[1], 1e-9)
        quiet = quiet + 1 if busy <= busy_limit else 0
        if quiet >= 2:
            break
    return time.perf_counter() - start


def own_autogroup() -> str | None:
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def set_priority(nice: int, console: Any) -> int:
    """Give this process and all it starts priority `nice`; returns the niceness in effect.

    With autogroup scheduling (Linux's default for desktops and many VMs) a process's nice only
    ranks it against its own session: the benchmark moves into a session of its own and sets
    that group's nice, which is what ranks it against other sessions' work.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setsid()
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError) as exc:
        console.print(f"[yellow]warning: cannot set priority {nice}: {exc}[/]")
        return 0


def machine_info() -> dict[str, Any]:
    dists = ("torch", "numpy", "safetensors", *(d for _, d in PEER_LIBRARIES.values()))
    info = base_machine_info(dists)
    info["torch_version"] = info["versions"].get("torch")
    return info


# -- measurements -----------------------------------------------------------------------------


def time_python_start() -> float:
    reset_peak_rss()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def time_torch_import() -> tuple[float, int, float]:
    """(import seconds inside a fresh process, that process's peak RSS, its wall time)."""
    reset_peak_rss()
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE], check=True, capture_output=True, text=True
    ).stdout.split()
    wall = time.perf_counter() - start
    return float(out[0]), int(out[1]), wall


def cold_start_run(
    package: Path, inputs: Path, strategy: str, work: Path, tag: str
) -> dict[str, Any]:
    """One fresh-process cold start; CICADA_LAUNCH_TIME is stamped just before the spawn."""
    timings_path = work / f"{tag}.json"
    out_path = work / f"{tag}.npy"
    cmd = [
        sys.executable,
        "-m",
        "cicada",
        "run",
        str(package),
        "--input",
        str(inputs),
        "--strategy",
        strategy,
        "--timings",
        str(timings_path),
        "--out",
        str(out_path),
    ]
    env = dict(os.environ)
    reset_peak_rss()
    env["CICADA_LAUNCH_TIME"] = repr(time.time())
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CicadaError(f"{strategy} did not finish within {RUN_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise CicadaError(f"{strategy} exited with {proc.returncode}: {err.strip()[-2000:]}")
    timings = dict(json.loads(timings_path.read_text()))
    timings["output_path"] = str(out_path)
    return timings


_SETUP = """
import json, sys
from pathlib import Path
from cicada.demos.cold_start import ensure_package, example_input
model, cache, inputs, tensorizer = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
package = ensure_package(model, cache)
example_input(model, inputs)
peer = None
if tensorizer == "1":
    from cicada.cloud.loading.registry import get_strategy
    peer = str(get_strategy("peer-tensorizer").prepare(package))
print(json.dumps({"package": str(package), "tensorizer": peer}))
"""


def set_up(model: str, cache_dir: Path, inputs: Path, tensorizer: bool) -> dict[str, Any]:
    """Pack the model (once), write its example input and, if asked, tensorizer's file, in a
    separate process: this one must not import torch (see `reset_peak_rss`)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _SETUP,
            model,
            str(cache_dir),
            str(inputs),
            "1" if tensorizer else "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise CicadaError(f"setting up {model} failed (exit {proc.returncode}); see above")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def usable(run: dict[str, Any]) -> bool:
    """A run that finished and, for the cold state, really started with the weights evicted."""
    return "error" not in run and not run.get("not_cold", False)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run whose time to first result is the median (the lower middle for even counts)."""
    ok = sorted((r for r in runs if usable(r)), key=lambda r: r["time_to_first_result_s"])
    return ok[(len(ok) - 1) // 2] if ok else None


def summarize_strategy(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if usable(r)]
    summary: dict[str, Any] = {
        "runs": len(ok),
        "failed": sum(1 for r in runs if "error" in r),
        "excluded_not_cold": sum(1 for r in runs if r.get("not_cold")),
    }
    if not ok:
        return summary
    for key in (
        "time_to_first_result_s",
        "process_start_s",
        *BREAKDOWN,
        "utilization",
        "peak_rss_bytes",
        "last_stage_compute_s",
        "read_gbps",
    ):
        summary[key] = median([r.get(key) for r in ok])
    summary["time_to_first_result_all_s"] = sorted(r["time_to_first_result_s"] for r in ok)
    summary["peak_rss_max_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    summary["resident_before"] = median([r.get("resident_before") for r in ok])
    summary["foreign_cpu_s"] = median([r.get("foreign_cpu_s") for r in ok])
    # A run never compared (no cicada run to compare with) is not a match.
    summary["outputs_match_cicada"] = all(r.get("output_matches_cicada") is True for r in ok)
    return summary


def compute_floor(
    samples: dict[str, list[float]],
    cicada: list[dict[str, Any]],
    others: dict[str, list[dict[str, Any]]],
    nbytes: int,
) -> dict[str, Any]:
    read_bw = median([nbytes / s for s in samples["read_s"]])
    last = median([r["last_stage_compute_s"] for r in cicada if usable(r)])
    source = "cicada last_stage_compute_s"
    if last is None:  # no cicada runs: the smallest median last compute span of any strategy
        candidates = [
            median([r["last_stage_compute_s"] for r in runs if usable(r)])
            for runs in others.values()
        ]
        last = min((c for c in candidates if c is not None), default=0.0)
        source = "min over strategies of last_stage_compute_s (no cicada runs)"
    floor = {
        "python_start_s": median(samples["python_start_s"]),
        "torch_import_s": median(samples["torch_import_s"]),
        "read_s": nbytes / read_bw if read_bw else None,
        "last_stage_compute_s": last,
    }
    total = sum(v for v in floor.values() if v is not None)
    return {
        **floor,
        "total_s": total,
        "bytes": nbytes,
        "read_gbps": read_bw / 1e9 if read_bw else None,
        "last_stage_source": source,
        "torch_import_process_wall_s": median(samples["torch_import_wall_s"]),
        "torch_only_rss_bytes": median(samples["torch_rss_bytes"]),
        "samples": samples,
    }


def check_targets(
    model: str, cache: str, strategies: dict[str, Any], floor: dict[str, Any], model_bytes: int
) -> list[dict[str, Any]]:
    """The issue's targets (stated for GPT-2-medium on the CPU machine), where measurable."""
    out: list[dict[str, Any]] = []
    c = strategies.get("cicada", {})
    ttfr = c.get("time_to_first_result_s")
    if ttfr is None:
        return out

    def add(target: str, value: str, ok: bool) -> None:
        out.append({"model": model, "cache": cache, "target": target, "value": value, "ok": ok})

    add(
        "cicada <= 1.2 x floor",
        f"{ttfr / floor['total_s']:.2f} x floor",
        ttfr <= 1.2 * floor["total_s"],
    )

    def other(name: str) -> float | None:
        value = strategies.get(name, {}).get("time_to_first_result_s")
        return float(value) if value is not None else None

    if (naive := other("naive")) is not None:
        need = 2.0 if cache == "warm" else 2.5
        add(f"cicada >= {need}x faster than naive", f"{naive / ttfr:.2f}x", naive / ttfr >= need)
    if (pisel := other("pisel")) is not None:
        add(
            "cicada >= 50% lower than pisel",
            f"{(1 - ttfr / pisel) * 100:.1f}% lower",
            ttfr <= 0.5 * pisel,
        )
    if (meta := other("meta")) is not None:
        if cache == "cold":
            add("cicada faster than meta (cold)", f"{meta / ttfr:.2f}x", ttfr < meta)
        else:
            add("cicada no slower than meta (warm)", f"{meta / ttfr:.2f}x", ttfr <= meta)
    for name in PEER_LIBRARIES:
        if (peer := other(name)) is not None:
            add(f"cicada faster than {name}", f"{peer / ttfr:.2f}x", ttfr < peer)
    construct = c.get("construct_s")
    if construct is not None:
        add("construction < 50 ms", f"{construct * 1000:.1f} ms", construct < 0.05)
    torch_rss = floor.get("torch_only_rss_bytes")
    if torch_rss:
        budget = model_bytes * RSS_FACTOR + torch_rss
        peak = c["peak_rss_max_bytes"]
        add(
            "peak RSS <= bytes x 1.15 + torch-only RSS",
            f"{peak / 2**20:.0f} MiB (max of runs) vs {budget / 2**20:.0f} MiB",
            peak <= budget,
        )
    return out


# -- output -----------------------------------------------------------------------------------


def _s(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(console: Any, model: str, cache: str, block: dict[str, Any]) -> None:
    from rich.table import Table

    floor = block["floor"]
    strategies = block["strategies"]
    base = strategies.get("cicada", {}).get("time_to_first_result_s")
    table = Table(
        title=f"{model}, page cache {cache}: median of {block['runs']} fresh-process "
        f"runs; floor {floor['total_s']:.3f} s",
        title_justify="left",
    )
    for col in (
        "strategy",
        "first result",
        "x floor",
        "cicada speedup",
        "import",
        "construct",
        "read",
        "apply",
        "compute",
        "wait",
        "util.",
        "peak RSS",
    ):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, s in strategies.items():
        ttfr = s.get("time_to_first_result_s")
        if ttfr is None:
            table.add_row(name, "failed", *["-"] * 10)
            continue
        table.add_row(
            name,
            f"{ttfr:.3f} s",
            f"{ttfr / floor['total_s']:.2f}",
            f"{ttfr / base:.2f}x" if base else "-",
            _s(s["import_s"]),
            _s(s["construct_s"], 3),
            _s(s["read_s"]),
            _s(s["apply_s"], 3),
            _s(s["compute_s"]),
            _s(s["wait_s"]),
            _s(s["utilization"]),
            f"{s['peak_rss_bytes'] / 2**20:.0f} MiB",
        )
    console.print(table)
    console.print(
        f"  floor = python start {_s(floor['python_start_s'], 3)} + torch import "
        f"{_s(floor['torch_import_s'], 3)} + read {floor['bytes'] / 1e9:.2f} GB at "
        f"{_s(floor['read_gbps'])} GB/s = {_s(floor['read_s'], 3)} + last stage compute "
        f"{_s(floor['last_stage_compute_s'], 3)} = {floor['total_s']:.3f} s"
    )
    cached = [
        s["resident_before"] for s in strategies.values() if s.get("resident_before") is not None
    ]
    if cached:
        console.print(
            f"  weights in the page cache at launch (mincore): {min(cached):.0%} to "
            f"{max(cached):.0%} (medians per strategy)"
        )
    excluded = {n: x for n, st in strategies.items() if (x := st.get("excluded_not_cold"))}
    if excluded:
        console.print(
            f"  [yellow]left out of the medians, weights still cached at launch: {excluded}[/]"
        )
    foreign = [r.get("foreign_cpu_s") or 0.0 for r in strategies.values()]
    console.print(
        f"  contention: CPU seconds other processes used during a run, median per strategy: "
        f"{min(foreign):.2f} to {max(foreign):.2f} s"
    )
    if "rss_budget_bytes" in block:
        peak = strategies.get("cicada", {}).get("peak_rss_max_bytes")
        verdict = "within" if peak is not None and peak <= block["rss_budget_bytes"] else "OVER"
        console.print(
            f"  RSS budget (cicada): model {block['model_bytes'] / 2**20:.0f} MiB x {RSS_FACTOR} "
            f"+ torch-only {floor['torch_only_rss_bytes'] / 2**20:.0f} MiB = "
            f"{block['rss_budget_bytes'] / 2**20:.0f} MiB; cicada peak "
            f"{'-' if peak is None else f'{peak / 2**20:.0f}'} MiB (max of runs): {verdict}"
        )
    for t in block["targets"]:
        mark = "[green]ok[/]" if t["ok"] else "[red]MISSED[/]"
        console.print(f"  target {t['target']}: {t['value']} {mark}")


def draw_gantt(
    path: Path,
    model: str,
    cache: str,
    runs: dict[str, dict[str, Any]],
    floor_s: float | None,
    dpi: int = 100,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(runs)
    lane_h, gap = 1.0, 1.2
    group_h = len(LANES) * lane_h + gap
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.13 * group_h * len(names)))
    xmax = max(r["time_to_first_result_s"] for r in runs.values()) * 1.08
    yticks, ylabels = [], []
    for g, name in enumerate(names):
        run = runs[name]
        top = -g * group_h
        for i, lane in enumerate(LANES):
            y = top - (i + 1) * lane_h
            bars = [
                (s["start"], max(s["end"] - s["start"], xmax / 2000))
                for s in run["spans"]
                if s["lane"] == lane
            ]
            if lane == "import" and run.get("process_start_s"):
                ax.broken_barh(
                    [(0.0, run["process_start_s"])],
                    (y + 0.1, lane_h * 0.8),
                    facecolors="#dddddd",
                    edgecolor="none",
                )
            if bars:
                ax.broken_barh(
                    bars,
                    (y + 0.1, lane_h * 0.8),
                    facecolors=LANE_COLORS[lane],
                    edgecolor="white",
                    linewidth=0.3,
                )
        ttfr = run["time_to_first_result_s"]
        bottom = top - len(LANES) * lane_h
        ax.plot([ttfr, ttfr], [bottom, top], color="black", linewidth=1.6)
        ax.text(ttfr + xmax * 0.005, top - 0.9, f"{ttfr:.2f} s", fontsize=7, va="center")
        yticks.append((top + bottom) / 2)
        ylabels.append(name)
        if g:
            ax.axhline(top + gap / 2, color="#cccccc", linewidth=0.5)
    if floor_s:
        ax.axvline(floor_s, color="#555555", linestyle="--", linewidth=0.9)
        ax.text(floor_s, 0.3, f"floor {floor_s:.2f} s", fontsize=7, ha="center", va="bottom")
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.set_ylim(-group_h * len(names) + gap / 2, 1.2)
    ax.set_xlim(0, xmax)
    ax.set_xlabel("seconds since launch")
    ax.set_title(
        f"{model}, page cache {cache}: median cold start per strategy "
        f"(lanes top to bottom: {', '.join(LANES)})",
        fontsize=9,
    )
    handles = [Patch(color="#dddddd", label="process start")]
    handles += [Patch(color=LANE_COLORS[lane], label=lane) for lane in LANES]
    handles.append(Patch(color="black", label="first result"))
    ax.legend(
        handles=handles,
        fontsize=7,
        ncol=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09 if len(names) > 3 else -0.25),
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# -- the benchmark ----------------------------------------------------------------------------


def installed_peers() -> list[str]:
    return [s for s, (mod, _) in PEER_LIBRARIES.items() if importlib.util.find_spec(mod)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--models",
        help="comma-separated reference models (default gpt2-medium; "
        f"known: {', '.join(REFERENCE_MODELS)})",
    )
    p.add_argument(
        "--strategies",
        help="comma-separated (default: every strategy whose "
        f"library is installed, of {', '.join(ALL_STRATEGIES)})",
    )
    p.add_argument("--cache", help="comma-separated page-cache states: warm,cold (default both)")
    p.add_argument("--runs", type=int, help="fresh-process runs per cell (default 5)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/cold_start"),
        help="output directory (default results/cold_start)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the benchmark keeps its packages (default: bench/ under $CICADA_CACHE or "
        "~/.cache/cicada, apart from packages other processes may keep mapped)",
    )
    p.add_argument(
        "--prime-gb",
        type=float,
        default=None,
        help="GiB to touch and free before every run and floor sample (default: 3 before cold "
        "ones, 0 before warm ones, whose runs the hand-back of a prime would stall; 0.25 / 0 "
        "with --quick)",
    )
    p.add_argument(
        "--evict",
        choices=("auto", "fadvise"),
        default="auto",
        help="cold state: auto = drop the whole page cache via /proc/sys/vm/drop_caches where "
        "writable, else posix_fadvise; fadvise = evict only the package files (libraries stay "
        "cached)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds for the machine to be idle "
        "(default 30; 0 with --quick)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=None,
        help="scheduling priority for the benchmark and every process it starts, so that other "
        "work on a shared machine disturbs the runs less (default -10 where permitted; 0 with "
        "--quick)",
    )
    p.add_argument("--dpi", type=int, default=100, help="Gantt chart resolution (default 100)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: gpt2-tiny, 2 runs, warm only (flags given still win)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.models = (args.models or ("gpt2-tiny" if quick else "gpt2-medium")).split(",")
    args.cache = (args.cache or ("warm" if quick else "warm,cold")).split(",")
    args.runs = args.runs if args.runs is not None else (2 if quick else 5)
    if args.prime_gb is None:
        args.prime_gb = {"cold": 0.25 if quick else 3.0, "warm": 0.0}
    else:
        args.prime_gb = {"cold": args.prime_gb, "warm": args.prime_gb}
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if quick else 30.0
    if args.nice is None:
        args.nice = 0 if quick else -10
    if args.strategies:
        args.strategies = args.strategies.split(",")
    else:
        args.strategies = [*BASE_STRATEGIES, *installed_peers()]
    for m in args.models:
        if m not in REFERENCE_MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(REFERENCE_MODELS)}")
    for c in args.cache:
        if c not in CACHE_STATES:
            p.error(f"unknown cache state {c!r}; use warm and/or cold")
    for s in args.strategies:
        if s not in ALL_STRATEGIES:
            p.error(f"unknown strategy {s!r}; known: {', '.join(ALL_STRATEGIES)}")
        if s in PEER_LIBRARIES and importlib.util.find_spec(PEER_LIBRARIES[s][0]) is None:
            p.error(
                f"{s} needs {PEER_LIBRARIES[s][1]}, which is not installed: "
                "pip install -e '.[bench]'"
            )
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # A benchmark-only package directory by default: a package that another process keeps
    # mapped (a running worker, another benchmark) cannot be evicted, and cold runs on it
    # would be warm.
    cache_dir = args.cache_dir or default_cache() / "bench"
    page_cache = PageCache(need_cold="cold" in args.cache, evict=args.evict)
    console.print(
        f"page-cache eviction for the cold state: [bold]{page_cache.method}[/] — "
        f"{page_cache.describe()}"
    )
    if "cold" in args.cache and page_cache.method == "none":
        console.print("[red]warning: the page cache cannot be dropped here; cold = warm[/]")
    console.print(
        "memory priming: GiB touched and freed before every run, "
        + ", ".join(f"{state} {gib:g}" for state, gib in args.prime_gb.items())
    )
    nice = set_priority(args.nice, console) if args.nice else 0
    console.print(
        f"priority: nice {nice} ({own_autogroup()}) for the benchmark and every process it "
        f"starts; before each sample it waits up to {args.quiet_wait:g} s for the machine to "
        "go idle"
    )
    peak_reset = reset_peak_rss()
    if not peak_reset:
        console.print(
            "[yellow]warning: cannot reset this process's peak RSS (/proc/self/clear_refs); "
            "children's ru_maxrss may include the launcher's peak[/]"
        )
    console.print(UTILIZATION_DEFINITION)
    machine = machine_info()
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "models": args.models,
            "strategies": args.strategies,
            "cache": args.cache,
            "runs": args.runs,
            "prime_gb": args.prime_gb,
            "evict": args.evict,
            "quiet_wait_s": args.quiet_wait,
        },
        "machine": machine,
        "eviction": {"method": page_cache.method, "description": page_cache.describe()},
        "launcher_peak_rss_reset": peak_reset,
        "nice": nice,
        "autogroup": own_autogroup(),
        "utilization_definition": UTILIZATION_DEFINITION,
        "floor_definition": "python start + torch import + file bytes / read bandwidth "
        "(same file, same cache state) + last stage's compute (cicada, median)",
        "runs": [],
        "models": {},
        "targets": [],
    }
    failures = 0
    # matplotlib is imported only after the last run: the launcher stays small.
    charts: list[tuple[Path, str, str, dict[str, Any], float]] = []
    work = Path(tempfile.mkdtemp(prefix="cicada-bench-"))
    try:
        for model in args.models:
            inputs = work / f"{model}-input.npy"
            with console.status(f"packing {model} (once) and preparing the peers' files"):
                paths = set_up(model, cache_dir, inputs, "peer-tensorizer" in args.strategies)
            package = Path(paths["package"])
            manifest = Manifest.load(package)
            weights = package / manifest.weights
            files = {
                s: [Path(paths["tensorizer"]) if s == "peer-tensorizer" else weights]
                for s in args.strategies
            }
            all_files = sorted({f for fs in files.values() for f in fs})
            file_bytes = weights.stat().st_size
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                c: {s: [] for s in args.strategies} for c in args.cache
            }
            samples: dict[str, dict[str, list[float]]] = {
                c: {
                    k: []
                    for k in (
                        "python_start_s",
                        "torch_import_s",
                        "torch_import_wall_s",
                        "torch_rss_bytes",
                        "read_s",
                        "resident_before_read",
                    )
                }
                for c in args.cache
            }
            reference: np.ndarray | None = None
            # Runs that finished before the first cicada run: compared once it has.
            uncompared: list[tuple[dict[str, Any], np.ndarray]] = []
            for cache in args.cache:
                if cache == "warm":
                    # One untimed start of each strategy first: "warm" is a page cache holding
                    # what an earlier start left (weights, python, torch and peer libraries),
                    # also after cold runs dropped it.
                    for strategy in args.strategies:
                        page_cache.prepare(cache, files[strategy])
                        with contextlib.suppress(CicadaError):
                            cold_start_run(package, inputs, strategy, work, "warm-up")
                for rep in range(args.runs):
                    # The floor's parts, in the same state as the runs.
                    s = samples[cache]
                    wait_for_quiet(args.quiet_wait)
                    prime_memory(args.prime_gb[cache])
                    page_cache.prepare(cache, all_files)
                    s["python_start_s"].append(time_python_start())
                    wait_for_quiet(args.quiet_wait)
                    prime_memory(args.prime_gb[cache])
                    page_cache.prepare(cache, all_files)
                    imp, rss, wall = time_torch_import()
                    s["torch_import_s"].append(imp)
                    s["torch_rss_bytes"].append(rss)
                    s["torch_import_wall_s"].append(wall)
                    wait_for_quiet(args.quiet_wait)
                    prime_memory(args.prime_gb[cache])
                    page_cache.prepare(cache, [weights])
                    s["resident_before_read"].append(resident_fraction(weights) or 0.0)
                    if cache == "cold" and s["resident_before_read"][-1] > NOT_COLD:
                        console.print(
                            f"[yellow]warning: {s['resident_before_read'][-1]:.0%} of the weights "
                            "stayed cached for the floor's cold read (mapped elsewhere?)[/]"
                        )
                    nbytes, seconds = sequential_read(weights)
                    s["read_s"].append(seconds * file_bytes / max(nbytes, 1))
                    k = rep % len(args.strategies)
                    order = args.strategies[k:] + args.strategies[:k]
                    for position, strategy in enumerate(order):
                        # Wait first: memory primed and then left idle goes back to the host.
                        waited = wait_for_quiet(args.quiet_wait)
                        prime_memory(args.prime_gb[cache])
                        page_cache.prepare(cache, files[strategy])
                        resident = resident_fraction(files[strategy][0])
                        for _ in range(3):  # pages some other process maps stay resident
                            if cache != "cold" or resident is None or resident <= NOT_COLD:
                                break
                            time.sleep(1.0)
                            page_cache.prepare(cache, files[strategy])
                            resident = resident_fraction(files[strategy][0])
                        tag = f"{model}-{cache}-{rep}-{strategy}"
                        record: dict[str, Any] = {
                            "model": model,
                            "cache": cache,
                            "rep": rep,
                            "strategy": strategy,
                            "position": position,
                            "resident_before": resident,
                            "launcher_rss_bytes": own_rss().get("VmRSS"),
                            "waited_for_quiet_s": waited,
                        }
                        if cache == "cold" and resident is not None and resident > NOT_COLD:
                            # Left out of the medians: this start was not cold.
                            record["not_cold"] = True
                        cpu_before, own_before = cpu_times(), children_cpu()
                        try:
                            timings = cold_start_run(package, inputs, strategy, work, tag)
                            cpu_after, own_after = cpu_times(), children_cpu()
                            if cpu_before and cpu_after:
                                # CPU seconds others used while this run was going on.
                                record["foreign_cpu_s"] = max(
                                    0.0, cpu_after[0] - cpu_before[0] - (own_after - own_before)
                                )
                        except CicadaError as exc:
                            failures += 1
                            record["error"] = str(exc)
                            console.print(f"[red]{tag}: {exc}[/]")
                        else:
                            output = np.load(timings.pop("output_path"))
                            if strategy == "cicada" and reference is None:
                                reference = output
                                for earlier, earlier_output in uncompared:
                                    earlier["output_matches_cicada"] = bool(
                                        np.array_equal(earlier_output, reference)
                                    )
                                uncompared.clear()
                            if reference is not None:
                                record["output_matches_cicada"] = bool(
                                    np.array_equal(output, reference)
                                )
                            else:
                                uncompared.append((record, output))
                            record.update(timings)
                            res = "-" if resident is None else f"{resident:.0%}"
                            console.print(
                                f"{tag:<40} first result {timings['time_to_first_result_s']:6.3f}"
                                f" s  (cached before launch: {res}; others' CPU during the run "
                                f"{record.get('foreign_cpu_s', 0.0):.2f} s, waited "
                                f"{record['waited_for_quiet_s']:.1f} s for quiet)"
                            )
                        runs[cache][strategy].append(record)
                        results["runs"].append(record)
            model_block: dict[str, Any] = {
                "package": str(package),
                "bytes": manifest.total_bytes,
                "file_bytes": file_bytes,
                "cache": {},
            }
            for cache in args.cache:
                cells = runs[cache]
                floor = compute_floor(samples[cache], cells.get("cicada", []), cells, file_bytes)
                strategies = {name: summarize_strategy(r) for name, r in cells.items()}
                block: dict[str, Any] = {
                    "runs": args.runs,
                    "floor": floor,
                    "strategies": strategies,
                    "model_bytes": manifest.total_bytes,
                }
                if floor.get("torch_only_rss_bytes"):
                    block["rss_budget_bytes"] = (
                        manifest.total_bytes * RSS_FACTOR + floor["torch_only_rss_bytes"]
                    )
                for st in strategies.values():
                    if st.get("time_to_first_result_s") is not None:
                        st["ratio_to_floor"] = st["time_to_first_result_s"] / floor["total_s"]
                        base = strategies.get("cicada", {}).get("time_to_first_result_s")
                        if base:
                            st["cicada_speedup"] = st["time_to_first_result_s"] / base
                block["targets"] = check_targets(
                    model, cache, strategies, floor, manifest.total_bytes
                )
                results["targets"].extend(block["targets"])
                representative = {n: r for n in cells if (r := median_run(cells[n])) is not None}
                if representative:
                    gantt = out / f"gantt-{model}-{cache}.png"
                    charts.append((gantt, model, cache, representative, floor["total_s"]))
                    block["gantt"] = gantt.name
                    block["gantt_runs"] = {n: r["rep"] for n, r in representative.items()}
                model_block["cache"][cache] = block
                print_table(console, model, cache, block)
            results["models"][model] = model_block
        for path, model, cache, representative, floor_s in charts:
            draw_gantt(path, model, cache, representative, floor_s, args.dpi)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    console.print(f"wrote {out / 'results.json'} and the Gantt charts in {out}")
    if failures:
        console.print(f"[red]{failures} run(s) failed; see 'error' in results.json[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
