"""`cicada status` reads a running coordinator's /metrics and /status.json (real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cicada import Client
from cicada.common.errors import CicadaError
from cicada.common.protocol import Request, encode
from cicada.edge.coordinator.status import fetch_live
from cicada.testing import ROOT, Stack
from cicada.testing.fake_worker import ReportingWorker


@contextlib.contextmanager
def raw_client(address: str) -> Iterator[zmq.Socket[Any]]:
    """A client socket that sends requests and reads no reply."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def cicada_status(stack: Stack, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cicada", "status", "--metrics", stack.metrics_url, *args],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        env=dict(os.environ, COLUMNS="160"),  # a terminal's width: the table is not folded
    )  # fmt: skip
    return out.stdout


def row(table: str, *cells: str) -> str:
    """The line of `table` whose cells start with `cells` (one per column, in order)."""
    pattern = r"\s*[│|]\s*".join(re.escape(c) for c in cells)
    lines = [line for line in table.splitlines() if re.search(r"[│|]\s*" + pattern, line)]
    assert len(lines) == 1, f"no single row {cells} in:\n{table}"
    return lines[0]


def test_status_shows_workers_and_outcomes(
    tiny_package: dict[str, Path], stack: Stack, client: Client
) -> None:
    assets = tiny_package
    stack.coordinator()
    stack.edge("gpt2", assets["edge"], name="edge-a")
    stack.wait_workers("edge")
    for _ in range(3):
        client.invoke("gpt2", np.load(assets["input"]), priority=0)
    # A cloud worker that stays loading (2 of 5 stages, 3.5 s to go) for a model of its own:
    # the first quality request runs on it (and never ends), the next two wait in its queue.
    with ReportingWorker(stack.address, "cloud-slow", "big", interval=stack.heartbeat / 2,
                         resident_stages=2, total_stages=5, eta_s=3.5), \
            raw_client(stack.address) as waiting:  # fmt: skip
        stack.wait_workers("cloud", state="loading")
        for i in range(3):
            waiting.send_multipart(encode(Request(id=f"q{i}", model="big", inputs=[
                np.zeros(4, np.float32)], priority=2, timeout_ms=120_000)))  # fmt: skip
        stack.wait_for(
            lambda s: any(q["model"] == "big" and q["priority"] == "2" and q["depth"] == 2
                          for q in s["queues"]),
            what="two quality requests queued for the loading worker",
        )  # fmt: skip
        snapshot = json.loads(cicada_status(stack, "--json"))
        table = cicada_status(stack)
    assert {"model": "gpt2", "role": "edge", "state": "ready", "count": 1} in snapshot["workers"]
    ok = [r for r in snapshot["requests"] if r["route"] == "edge" and r["status"] == "OK"]
    assert ok and ok[0]["count"] == 3
    assert "edge-a" in snapshot["residency"]
    # The table shows what /status.json holds: each worker's residency and ETA, the queues by
    # priority, the latency of the answered requests by model and route.
    live = snapshot["live"]
    models = {m["name"]: m for m in live["models"]}
    assert row(table, "gpt2", "edge-a", "edge", "ready", "loaded", "–", "0/2")
    assert row(table, "big", "cloud-slow", "cloud", "loading", "2/5 ████░░░░░░", "3.50 s", "1/1")
    assert models["big"]["queues"] == {"0": 0, "1": 0, "2": 2}
    assert row(table, "big", "0", "0", "2")
    (edge,) = models["gpt2"]["latency"]
    assert edge["route"] == "edge" and edge["count"] == 3
    p50, p99 = (f"{edge[k] * 1000:.1f} ms" for k in ("p50_s", "p99_s"))
    assert row(table, "gpt2", "edge", "3", p50, p99)
    assert row(table, "gpt2", "edge", "OK", "3")  # the outcomes since the start, from /metrics


def test_status_says_what_to_do_when_nothing_listens(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cicada", "status", "--metrics", "http://127.0.0.1:9/metrics"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "is the coordinator running" in out.stderr


def test_worker_counts_of_an_unreachable_coordinator_are_an_error(stack: Stack) -> None:
    """ "No workers" must mean the coordinator said so: with nobody on the metrics port, the
    count raises rather than reading 0 (every "no workers left" check would pass on it)."""
    with pytest.raises(CicadaError, match="cannot read"):
        stack.workers("cloud")


@contextlib.contextmanager
def serving(documents: dict[str, bytes]) -> Iterator[str]:
    """A real HTTP server (common/httpd.py) answering each path with its document, 404
    otherwise; yields its metrics URL."""
    from cicada.common.httpd import serve_wsgi
    from cicada.testing import free_port

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = documents.get(environ["PATH_INFO"])
        start_response("200 OK" if body is not None else "404 Not Found", [])
        return [body or b""]

    port = free_port()
    server = serve_wsgi("127.0.0.1", port, app, "test-status")
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()


METRICS = b"""# TYPE cicada_workers gauge
cicada_workers{model="m",role="edge",state="ready"} 1.0
"""


@pytest.mark.parametrize(
    "document",
    [
        None,  # an older coordinator: no /status.json
        b"# HELP cicada_workers ...",  # not JSON
        b'{"models": [{"name": "[red]m", "workers": [{"name": 5}], "queues": {}, "latency": []}]}',
        b'{"models": [{"name": "m", "workers": [], "queues": {"2": "many"}, "latency": []}]}',
        b"[" * 100_000,  # nested past the parser's depth
    ],
    ids=["absent", "not-json", "worker-name-not-text", "queue-depth-not-int", "deep"],
)
def test_a_coordinator_without_a_status_document_still_shows_its_counts(
    document: bytes | None,
) -> None:
    """The table of /metrics alone, and on stderr why residency, queues and latency are missing;
    a document of the wrong shape is refused whole, never half shown."""
    documents = {"/metrics": METRICS}
    if document is not None:
        documents["/status.json"] = document
    with serving(documents) as url:
        out = subprocess.run(
            [sys.executable, "-m", "cicada", "status", "--metrics", url],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert row(out.stdout, "m", "edge", "ready", "1")
        assert "no residency, queues by priority or latency" in out.stderr
        assert "Traceback" not in out.stderr
        with pytest.raises(CicadaError, match=r"not a Cicada status document|cannot read"):
            fetch_live(url, timeout=10)
