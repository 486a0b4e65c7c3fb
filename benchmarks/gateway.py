#!/usr/bin/env python3
"""Gateway benchmark: what the HTTP gateway adds over the ZeroMQ SDK, for the same request on
the same stack in the same run.

    python3 -m benchmarks.gateway                  # 400 latency pairs, 6 s per throughput run
    python3 -m benchmarks.gateway --quick          # a smoke run: a few seconds

The stack is real processes (cicada.testing.Stack): a coordinator, an edge agent serving a tiny
GPT-2 (ONNX Runtime) and `cicada gateway` in front of them. The request: the model's logits for
8 token ids ((1, 8) int64 in, (1, 8, 97) float32 out, 3 KB).

A. Latency, one request at a time. Each round sends the request once through the SDK
   (`cicada.Client.invoke`) and once through the gateway (KServe v2 infer over one keep-alive
   connection, the standard library's http.client), in alternating order, so both see the same
   machine. Gateway forms: JSON tensors in and out, and binary data out (the extension). The
   overhead is gateway - SDK at p50 and p99.
B. Throughput with concurrency C: requests answered per second in a fixed window, the SDK
   (`cicada.AsyncClient`, C calls in flight) and the gateway (C keep-alive connections, a
   minimal asyncio HTTP/1.1 client: the load generator should cost little of the 2 cores it
   shares with the stack). Also the CPU time each process spends per request (coordinator,
   edge agent, gateway, load generator): on 2 shared cores every process's CPU costs the
   others throughput, so the ratio gateway/SDK falls below 1 by what the gateway's CPU takes;
   the gateway is the stack's bottleneck only if its CPU per request is the largest.

The machine is shared and noisy: compare figures from the same run, never a lone absolute
time. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.machine import loadavg, machine_info
from cicada import AsyncClient, Client
from cicada.testing import Stack, make_assets
from cicada.testing.gateway import start_gateway

IDS = np.arange(8, dtype=np.int64).reshape(1, 8) + 3
TARGET_P50_OVERHEAD_MS = 1.0
ROLES = ("coordinator", "edge", "gateway")


def _infer_body(binary_out: bool) -> bytes:
    tensor = {"name": "input", "shape": list(IDS.shape), "datatype": "INT64",
              "data": IDS.ravel().tolist()}  # fmt: skip
    doc: dict[str, Any] = {"inputs": [tensor]}
    if binary_out:
        doc["parameters"] = {"binary_data_output": True}
    return json.dumps(doc).encode()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency(stack: Stack, url: str, rounds: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    path = "/v2/models/gpt2/infer"
    bodies = {"json": _infer_body(False), "binary": _infer_body(True)}
    samples: dict[str, list[float]] = {"sdk": [], "json": [], "binary": []}
    with Client(stack.address, timeout=60) as sdk:

        def via_sdk() -> None:
            sdk.invoke("gpt2", IDS)

        def via_gateway(form: str) -> None:
            conn.request("POST", path, body=bodies[form],
                         headers={"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"gateway answered {response.status}")

        calls = {"sdk": via_sdk, "json": lambda: via_gateway("json"),
                 "binary": lambda: via_gateway("binary")}  # fmt: skip
        for call in calls.values():  # warm up every path once (imports, first dispatch)
            for _ in range(20):
                call()
        order = list(calls)
        for i in range(rounds):
            for name in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
    conn.close()
    out: dict[str, Any] = {"rounds": rounds}
    for name, values in samples.items():
        out[name] = {
            "p50_ms": _percentile(values, 50) * 1000,
            "p99_ms": _percentile(values, 99) * 1000,
        }
    for form in ("json", "binary"):
        out[f"overhead_{form}"] = {q: out[form][q] - out["sdk"][q] for q in ("p50_ms", "p99_ms")}
    return out


async def _http_worker(host: str, port: int, body: bytes, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v2/models/gpt2/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        while time.monotonic() < stop:
            writer.write(head + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"gateway answered {status!r}")
            counts[0] += 1
    finally:
        writer.close()


async def _sdk_worker(client: AsyncClient, stop: float, counts: list[int]) -> None:
    while time.monotonic() < stop:
        await client.invoke("gpt2", IDS)
        counts[0] += 1


def _cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


async def _throughput(stack: Stack, url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    procs = {name: psutil.Process(stack.procs[name].pid) for name in ROLES}
    procs["load generator"] = psutil.Process()
    out: dict[str, Any] = {}
    for name in ("sdk", "gateway", "sdk_again"):
        counts = [0]
        stop = time.monotonic() + seconds
        start = time.perf_counter()
        cpu_before = _cpu_seconds(procs)
        if name.startswith("sdk"):
            async with AsyncClient(stack.address, timeout=60) as client:
                await asyncio.gather(
                    *(_sdk_worker(client, stop, counts) for _ in range(concurrency))
                )
        else:
            body = _infer_body(True)
            await asyncio.gather(*(_http_worker(host, int(port), body, stop, counts)
                                   for _ in range(concurrency)))  # fmt: skip
        out[f"{name}_rps"] = counts[0] / (time.perf_counter() - start)
        cpu_after = _cpu_seconds(procs)
        # CPU milliseconds each process spent per request answered: on a machine whose cores
        # they share, the largest is the stack's bottleneck.
        out[f"{name}_cpu_ms_per_request"] = {
            k: 1000 * (cpu_after[k] - cpu_before[k]) / max(counts[0], 1) for k in procs
        }
    sdk = (out["sdk_rps"] + out["sdk_again_rps"]) / 2  # before and after: drift shows
    out["gateway_over_sdk"] = out["gateway_rps"] / sdk
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds, opts.seconds, opts.concurrency = 30, 1.0, [4]
    with tempfile.TemporaryDirectory(prefix="cicada-gateway-bench-") as tmp:
        work = Path(tmp)
        assets = make_assets(work)
        with Stack(work) as stack:
            stack.coordinator()
            stack.edge("gpt2", assets["edge"], "edge")
            stack.wait_workers("edge", 1, state="ready")
            url = start_gateway(stack)
            results: dict[str, Any] = {"machine": machine_info(["starlette", "uvicorn"]),
                                       "loadavg_before": loadavg()}  # fmt: skip
            results["latency"] = latency(stack, url, opts.rounds)
            results["throughput"] = {
                str(c): asyncio.run(_throughput(stack, url, c, opts.seconds))
                for c in opts.concurrency
            }
            results["loadavg_after"] = loadavg()
            stack.stop()
    lat = results["latency"]
    results["target"] = {
        "p50_overhead_ms_max": TARGET_P50_OVERHEAD_MS,
        "met": lat["overhead_binary"]["p50_ms"] <= TARGET_P50_OVERHEAD_MS,
    }
    print(f"latency, {lat['rounds']} rounds (ms)       p50      p99")
    for name in ("sdk", "json", "binary"):
        print(f"  {name:<30} {lat[name]['p50_ms']:8.3f} {lat[name]['p99_ms']:8.3f}")
    for form in ("json", "binary"):
        o = lat[f"overhead_{form}"]
        print(f"  gateway overhead ({form:<6})       {o['p50_ms']:8.3f} {o['p99_ms']:8.3f}")
    print("throughput (requests/s)   sdk   gateway  sdk again  gateway/sdk")
    for c, t in results["throughput"].items():
        print(f"  concurrency {c:>3}   {t['sdk_rps']:8.0f} {t['gateway_rps']:8.0f} "
              f"{t['sdk_again_rps']:8.0f}     {t['gateway_over_sdk']:.2f}")  # fmt: skip
    print("CPU ms per request through the gateway (concurrency " + max(results["throughput"],
          key=int) + "):")  # fmt: skip
    cpu = results["throughput"][max(results["throughput"], key=int)]["gateway_cpu_ms_per_request"]
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
