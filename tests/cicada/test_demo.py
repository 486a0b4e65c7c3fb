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
    # It served: both sides answered (the burst's last quality-seeking requests wait for the
    # cloud to be ready, so the cold start's length does not decide this).
    served = [r for r in requests if r["status"] == "OK"]
    assert {r["served_by"] for r in served} == {"edge", "cloud"}, requests
    assert summary["cloud_ready_at_s"] is not None
    check_never_dispatched_to_a_cold_cloud(summary)
    check_the_mission(summary, requests)
    check_the_residency_display(summary)
    assert summary["cache"]["path"] == str(tmp_path / "cache")
    assert summary["cache"]["bytes"] > 0


def check_the_mission(summary: dict, requests: list[dict]) -> None:
    """The summary's share of the quality-seeking requests sent after the cloud was ready that
    the cloud served is the one its per-request records give, and it is at least half."""
    after = [r for r in requests if r["priority"] == 2 and r["after_ready"]]
    for r in after:  # "after ready": sent once the demo had seen the cloud ready
        assert r["sent_at"] >= summary["cloud_cold_until_s"], r
    cloud = sum(r["status"] == "OK" and r["served_by"] == "cloud" for r in after)
    reported = summary["quality_after_ready"]
    assert (reported["sent"], reported["cloud"]) == (len(after), cloud)
    assert reported["sent"] >= 1 and reported["share"] == cloud / len(after)
    assert reported["share"] >= 0.5, after
    critical = [r for r in requests if r["priority"] == 0]
    in_time = sum(r["served_by"] == "edge" and r["met_deadline"] for r in critical)
    assert summary["critical"] == {"sent": len(critical), "edge_in_time": in_time}


def check_the_residency_display(summary: dict) -> None:
    """What the live bar showed: a stage total from the first frame on; the worker's phases in
    protocol order, the import among them; no stage resident before the model is built, and
    never more resident than read."""
    frames = summary["residency"]
    assert frames[0]["phase"] == "launching" and frames[0]["total_stages"] == 4  # gpt2-tiny
    assert all(f["total_stages"] == 4 for f in frames)
    order = ["launching", "importing", "constructing", "loading", "ready"]
    seen = [order.index(f["phase"]) for f in frames]
    assert seen == sorted(seen), frames
    assert {"importing", "ready"} <= {f["phase"] for f in frames}, frames
    for f in frames:
        assert f["resident_stages"] <= f["read_stages"] or f["phase"] == "launching", f
        if f["phase"] in ("launching", "importing"):
            assert f["resident_stages"] == 0, f
    assert frames[-1]["resident_stages"] == 4 and frames[-1]["state"] == "ready"


def check_never_dispatched_to_a_cold_cloud(summary: dict) -> None:
    """Latency-critical and normal work is never dispatched to a cloud worker that is not
    ready. Compared: the latest each was dispatched (its answer's arrival less the time the
    coordinator saw it on the worker) with the last time the demo saw the cloud not ready.
    (Not its completion: work dispatched to a loading worker completes after the load.)"""
    cold_until = summary["cloud_cold_until_s"]
    assert 0 <= cold_until <= summary["cloud_ready_at_s"], summary
    for r in summary["requests"]:
        if r["status"] == "OK":
            assert r["dispatched_by_s"] is not None, r
            assert r["sent_at"] - 0.05 <= r["dispatched_by_s"] <= r["sent_at"] + r["latency_s"]
        if r["status"] == "OK" and r["served_by"] == "cloud" and r["priority"] <= 1:
            assert r["dispatched_by_s"] >= cold_until, r


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


def test_a_cached_input_that_does_not_load_is_made_again(tmp_path: Path) -> None:
    """The example input kept in the cache is data: a truncated file or a pickle is not
    loaded, it is written again from the model's example."""
    import numpy as np

    from cicada.demos.live import cached_input

    path = tmp_path / "inputs" / "gpt2-tiny.npy"
    path.parent.mkdir()
    for junk in (b"\x93NUMPY truncated", np.lib.format.MAGIC_PREFIX + b"\x01\x00pickle"):
        path.write_bytes(junk)
        made = cached_input("gpt2-tiny", tmp_path)
        assert made.dtype == np.int64 and made.ndim == 2
        assert np.array_equal(np.load(path, allow_pickle=False), made)
    kept = np.array([[3, 1, 4]], dtype=np.int64)  # a valid file is what the demo sends
    np.save(path, kept)
    assert np.array_equal(cached_input("gpt2-tiny", tmp_path), kept)
