"""The README's main command, end to end on the tiny model (real processes, real sockets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str) -> dict:
    env = dict(os.environ, CICADA_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "cicada", *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_demo_answers_every_request_exactly_once(tmp_path: Path) -> None:
    summary = _run(tmp_path, "demo", "--model", "gpt2-tiny", "--requests", "16", "--rate", "8")
    requests = summary["requests"]
    assert sorted(r["id"] for r in requests) == list(range(16))  # all, once each
    for r in requests:
        assert r["priority"] in (0, 1, 2)
        assert r["status"] in ("OK", "TIMEOUT", "REJECTED", "UNAVAILABLE")
        assert r["status"] != "OK" or r["served_by"] in ("edge", "cloud")
        assert r["latency_s"] >= 0
    # Latency-critical work is never sent to a cloud worker that is not ready yet. (The demo
    # notices readiness by polling the metrics every ~0.1 s, hence the slack.)
    ready_at = summary["cloud_ready_at_s"]
    if ready_at is not None:
        for r in requests:
            if r["priority"] == 0 and r["served_by"] == "cloud":
                assert r["sent_at"] + r["latency_s"] >= ready_at - 0.5, r


def test_coldstart_compares_every_strategy(tmp_path: Path) -> None:
    summary = _run(tmp_path, "coldstart", "--model", "gpt2-tiny")
    assert set(summary["results"]) == {"cicada", "meta", "pisel", "naive"}
    for timings in summary["results"].values():
        assert timings["time_to_first_result_s"] > 0 and timings["peak_rss_bytes"] > 0


def test_demo_takes_text_only_for_a_model_that_reads_text(tmp_path: Path) -> None:
    env = dict(os.environ, CICADA_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "cicada", "demo", "--model", "gpt2-tiny",
                           "--text", "hello"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "--text goes with --model minilm" in done.stderr
    assert not (tmp_path / "cache").exists()  # refused before packing anything
