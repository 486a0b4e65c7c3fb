"""Smoke test for the gateway benchmark (`python3 -m benchmarks.gateway --quick`, ~10 s): it
runs end to end against a real stack and reports every figure. No timing is asserted: these
machines are noisy."""

from __future__ import annotations

import pytest

from tests.benchmarks.run import run_benchmark

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def test_quick_gateway_benchmark() -> None:
    results = run_benchmark(["-m", "benchmarks.gateway", "--quick"], 300)
    latency = results["latency"]
    for path in ("sdk", "json", "binary"):
        assert 0 < latency[path]["p50_ms"] <= latency[path]["p99_ms"], latency
    assert set(latency["overhead_binary"]) == {"p50_ms", "p99_ms"}
    (window,) = results["throughput"].values()
    assert window["sdk_rps"] > 0 and window["gateway_rps"] > 0
    assert window["gateway_cpu_ms_per_request"]["gateway"] > 0
    # The SDK's run bypasses the gateway, which only ticks meanwhile.
    cpu = window["gateway_cpu_ms_per_request"]["gateway"]
    assert window["sdk_cpu_ms_per_request"]["gateway"] < cpu
    assert isinstance(results["target"]["met"], bool)
