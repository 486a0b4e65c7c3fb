"""The coordinator's live page (`/`) and its JSON (`/status.json`), against one real stack per
module: a coordinator, an edge agent and a cloud worker (tiny GPT-2) as processes, requests
through the SDK, and a worker of our own that stays loading under a hostile name. The page is
loaded in a real headless browser (Debian's chromium; skipped when none is installed).

`python -m tests.edge.test_live_page --screenshot docs/img/live-page.png` takes the screenshot
in docs/ (a larger GPT-2, so that its cold start can be seen)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from cicada import Client
from cicada.common.protocol import Role, WorkerState
from cicada.edge.coordinator.live import (
    LATENCY_POINTS,
    LATENCY_SERIES,
    RECENT_REQUESTS,
    LiveStatus,
)
from cicada.testing import Stack
from cicada.testing.fake_worker import ReportingWorker

WAIT_S = 60.0
BIG = "gpt2-big"
# A worker name a peer may choose: the page must show it as text, never run it.
HOSTILE = "<img src=x onerror=\"document.title='owned'\">&amp;<b>bold</b>"
RECENT_KEYS = {"age_s", "model", "priority", "route", "worker", "handed_off", "status",
               "latency_s"}  # fmt: skip
WORKER_KEYS = {"name", "role", "state", "variant", "resident_stages", "total_stages", "eta_s",
               "capacity", "busy", "compute_s", "phase", "phase_s", "read_stages",
               "batch_marginal"}  # fmt: skip


def chromium() -> str | None:
    """Debian's `chromium` (or CICADA_CHROMIUM), None when there is none."""
    named = os.environ.get("CICADA_CHROMIUM")
    if named:
        return shutil.which(named)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


needs_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary (apt-get install chromium, or set CICADA_CHROMIUM)",
)


def headless(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium, headless, on `url`: the page's script runs (its timers on virtual time, so its
    refresh loop neither waits nor hangs the browser) before `args` act (--dump-dom ...)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("no chromium binary (apt-get install chromium, or set CICADA_CHROMIUM)")
    return subprocess.run(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
         "--virtual-time-budget=3000", *args, url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@dataclass
class Live:
    stack: Stack
    base: str  # http://127.0.0.1:PORT
    served: list[tuple[int, str]] = field(default_factory=list)  # (priority, worker) replied


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory,
         tiny_package: dict[str, Path]) -> Iterator[Live]:  # fmt: skip
    work = tmp_path_factory.mktemp("live-page")
    with Stack(work) as stack:
        stack.coordinator()
        stack.edge("gpt2", tiny_package["edge"], name="edge-a")
        stack.cloud("gpt2", tiny_package["package"], name="cloud-a")
        stack.wait_workers("edge", timeout=WAIT_S)
        stack.wait_workers("cloud", state="ready", timeout=WAIT_S)
        # A worker of our own on a model nobody asks for: it stays loading (1 of 3 stages, 4.2 s
        # to go) under the hostile name.
        loading = ReportingWorker(stack.address, HOSTILE, BIG, interval=stack.heartbeat / 2,
                                  resident_stages=1, total_stages=3, eta_s=4.2)  # fmt: skip
        try:
            stack.wait_workers("cloud", count=2, timeout=WAIT_S)
            state = Live(stack, stack.metrics_url.rsplit("/", 1)[0])
            x = np.load(tiny_package["input"])
            with Client(stack.address, timeout=30) as client:
                for priority in (0, 2, 0, 2, 1):
                    result = client.invoke("gpt2", x, priority=priority)
                    state.served.append((priority, result.served_by["worker"]))
            yield state
        finally:
            loading.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def status_json(live: Live) -> dict[str, Any]:
    code, headers, body = get(live.base + "/status.json")
    assert code == 200 and headers["Content-Type"] == "application/json"
    return dict(json.loads(body))


# -- /status.json, without a browser ----------------------------------------------------------


def test_status_json_shows_workers_queues_and_the_requests_made(live: Live) -> None:
    snapshot = status_json(live)
    models = {m["name"]: m for m in snapshot["models"]}
    assert set(models) == {"gpt2", BIG}
    gpt2 = models["gpt2"]
    workers = {w["name"]: w for w in gpt2["workers"]}
    assert set(workers) == {"edge-a", "cloud-a"}
    for w in workers.values():
        assert set(w) == WORKER_KEYS and w["state"] == "ready"
        assert isinstance(w["capacity"], int) and 0 <= w["busy"] <= w["capacity"]
    assert workers["edge-a"]["role"] == "edge" and workers["cloud-a"]["role"] == "cloud"
    cloud = workers["cloud-a"]
    assert cloud["total_stages"] > 0 and cloud["resident_stages"] == cloud["total_stages"]
    assert cloud["phase"] == "ready" and cloud["read_stages"] == cloud["total_stages"]
    assert workers["edge-a"]["phase"] is None  # an edge agent reports no start-up phase
    (loading,) = models[BIG]["workers"]
    assert (loading["name"], loading["state"]) == (HOSTILE, "loading")
    assert (loading["resident_stages"], loading["total_stages"], loading["eta_s"]) == (1, 3, 4.2)
    assert gpt2["queues"] == {"0": 0, "1": 0, "2": 0}  # the coordinator has set each
    # The last requests, newest first, as the replies said: who served each, with what priority.
    recent = snapshot["recent"]
    assert [(r["priority"], r["worker"]) for r in reversed(recent)] == live.served
    for r in recent:
        assert set(r) == RECENT_KEYS  # no inputs, outputs or clients: nothing else is there
        assert r["model"] == "gpt2" and r["status"] == "OK" and r["latency_s"] > 0
        assert r["route"] == ("edge" if r["worker"] == "edge-a" else "cloud")
    # The latency chart's points are those requests, per route.
    routes = {s["route"]: s for s in gpt2["latency"]}
    for route, series in routes.items():
        answered = [r for r in recent if r["route"] == route]
        assert series["count"] == len(answered) == len(series["points"])
        assert sorted(p[1] for p in series["points"]) == sorted(
            round(r["latency_s"], 6) for r in answered
        )
        assert series["p50_s"] <= series["p99_s"]
    assert set(routes) == {r["route"] for r in recent}
    assert snapshot["limits"]["recent"] == RECENT_REQUESTS


def test_the_page_is_one_self_contained_document(live: Live) -> None:
    code, headers, body = get(live.base + "/")
    page = body.decode()
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    # Nothing is fetched from elsewhere: no external script, style or image, and a policy that
    # would refuse one anyway.
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    for external in ("http://", "https://", "<script src", "<link"):
        assert external not in page.replace("http://www.w3.org/2000/svg", "")
    # /metrics is still Prometheus' exposition on the same port.
    code, headers, body = get(live.base + "/metrics")
    assert code == 200 and b"cicada_requests_total" in body


def test_idle_and_slow_connections_do_not_keep_the_page_out(live: Live) -> None:
    """common/httpd.py holds idle connections at its door: the page and its JSON go through
    the same server, so a crowd of silent connections and one that never finishes its request
    delay neither."""
    host, port = live.base.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(50)]
    try:
        held[0].sendall(b"GET /status.json HTTP/1.1\r\nHost: x\r\n")  # never ends its head
        assert get(live.base + "/")[0] == 200
        assert status_json(live)["models"]
    finally:
        for sock in held:
            sock.close()


def test_other_methods_are_refused(live: Live) -> None:
    request = urllib.request.Request(live.base + "/status.json", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405


# -- the page in a real browser ---------------------------------------------------------------


class Elements(HTMLParser):
    """Every element of a serialized DOM with its attributes and its text content."""

    VOID: ClassVar[set[str]] = {"area", "base", "br", "col", "embed", "hr", "img", "input",
                                "link", "meta", "source", "track", "wbr"}  # fmt: skip

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self.open: list[tuple[str, dict[str, str], list[str]]] = []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = (tag, {k: v or "" for k, v in attrs}, [])
        self.found.append(element)
        if tag not in self.VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, _, text in self.open:
            text.append(data)

    def having(self, cls: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        """(attributes, text) of the elements of class `cls` with these data-* attributes."""
        return [
            (a, "".join(text)) for _, a, text in self.found
            if cls in a.get("class", "").split()
            and all(a.get("data-" + k) == v for k, v in attrs.items())
        ]  # fmt: skip

    def cell(self, row: tuple[dict[str, str], str], cls: str) -> str:
        """The text of the element of class `cls` inside `row` (the first one after it)."""
        start = next(i for i, (_, a, _) in enumerate(self.found) if a is row[0])
        for _, a, text in self.found[start + 1 :]:
            if cls in a.get("class", "").split():
                return "".join(text)
        raise AssertionError(f"no .{cls} in {row[1]!r}")


@needs_chromium
def test_the_page_in_headless_chromium_shows_the_stack(live: Live, tmp_path: Path) -> None:
    dom = headless(live.base + "/", tmp_path / "profile", "--dump-dom").stdout
    page = Elements(dom)
    assert page.having("model", model="gpt2") and page.having("model", model="gpt2-big")
    # The workers, with their residency: the cloud worker's stages all resident, the edge
    # agent's model loaded, our worker 1 of 3 with its ETA.
    edge = page.having("worker", name="edge-a", role="edge")
    cloud = page.having("worker", name="cloud-a", role="cloud")
    assert len(edge) == 1 and len(cloud) == 1
    assert page.cell(edge[0], "state") == "ready" and page.cell(edge[0], "stages") == "loaded"
    total = status_json(live)["models"][0]["workers"][0]["total_stages"]
    assert page.cell(cloud[0], "stages") == f"{total}/{total} stages"
    (loading,) = page.having("worker", role="cloud", name=HOSTILE)
    assert page.cell(loading, "state") == "loading"
    assert page.cell(loading, "stages") == "1/3 stages" and page.cell(loading, "eta") == "4.20 s"
    # The hostile name is text on the page, not markup: no image, no bold, no script ran.
    assert page.cell(loading, "name") == HOSTILE
    assert not [tag for tag, _, _ in page.found if tag in ("img", "b")]
    assert "<title>Cicada coordinator</title>" in dom
    # The requests just made, newest first, each with who served it.
    rows = page.having("request")
    shown = [(page.cell(r, "worker"), r[0]["data-route"], r[0]["data-status"]) for r in rows]
    expected = [(worker, "edge" if worker == "edge-a" else "cloud", "OK")
                for _, worker in reversed(live.served)]  # fmt: skip
    assert shown == expected
    # One latency chart per route that answered, a point per answered request.
    charts = {a.get("data-route") for tag, a, _ in page.found if tag == "svg"}
    assert charts == {route for _, route, _ in shown}
    circles = [t for t, _, _ in page.found if t == "circle"]
    assert len(circles) == len(live.served)


@needs_chromium
def test_a_screenshot_is_a_picture_of_the_page(live: Live, tmp_path: Path) -> None:
    png = tmp_path / "page.png"
    headless(live.base + "/", tmp_path / "profile", f"--screenshot={png}",
             "--window-size=1280,900")  # fmt: skip
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1280, 900)


# -- the coordinator's bookkeeping, bounded ----------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def test_the_history_stays_bounded_however_many_requests_and_models() -> None:
    live = LiveStatus(clock=Ticks())
    for i in range(5000):
        model = f"m{i % 100}"
        live.request_ended(model, ("edge", "cloud")[i % 2], "OK", 0.001 * (i % 7 + 1), i % 3,
                           {"worker": f"w{i % 5}", "role": "edge"})  # fmt: skip
    live.request_ended("m0", "none", "REJECTED", 0.0)
    snapshot = json.loads(json.dumps(live.snapshot(), allow_nan=False))
    assert len(snapshot["recent"]) == RECENT_REQUESTS
    assert snapshot["recent"][0]["status"] == "REJECTED"  # newest first
    assert snapshot["recent"][0]["priority"] is None and snapshot["recent"][0]["worker"] == ""
    series = [s for m in snapshot["models"] for s in m["latency"]]
    assert len(series) == LATENCY_SERIES
    assert all(len(s["points"]) <= LATENCY_POINTS for s in series)
    assert snapshot["latency_series_untracked"] > 0  # counted, not kept
    assert len(json.dumps(snapshot)) < 2_000_000


def test_percentiles_are_of_the_points_kept() -> None:
    live = LiveStatus(clock=Ticks())
    for ms in range(1, 101):
        live.request_ended("m", "cloud", "OK", ms / 1000)
    live.request_ended("m", "cloud", "TIMEOUT", 9.0)  # not answered: not a latency point
    (series,) = live.snapshot()["models"][0]["latency"]
    assert (series["count"], series["p50_s"], series["p99_s"]) == (100, 0.050, 0.099)
    ages = [age for age, _ in series["points"]]
    assert ages == sorted(ages, reverse=True)  # oldest first, as the chart draws them


def test_estimates_json_cannot_carry_are_shown_as_unknown() -> None:
    @dataclass
    class Worker:  # the attributes of registry.WorkerInfo the page reads
        name: str = "w"
        role: Role = Role.CLOUD
        state: WorkerState = WorkerState.LOADING
        models: list[str] = field(default_factory=lambda: ["m"])
        variant: str = ""
        resident_stages: int = 0
        total_stages: int = 2
        eta_s: float | None = float("nan")
        compute_s: float | None = float("inf")
        capacity: int = 1
        batch_marginal: float | None = float("nan")
        inflight: dict[str, Any] = field(default_factory=dict)
        phase: str | None = "loading"
        phase_s: float | None = float("nan")
        read_stages: int = 2

    live = LiveStatus()
    live.set_workers([Worker()])
    (worker,) = json.loads(json.dumps(live.snapshot(), allow_nan=False))["models"][0]["workers"]
    assert worker["eta_s"] is None and worker["compute_s"] is None and worker["phase_s"] is None
    assert worker["batch_marginal"] is None


# -- the screenshot in docs/ -------------------------------------------------------------------


def screenshot(out: Path) -> None:
    """A stack whose cloud worker cold-starts a 12-layer GPT-2 while the edge answers a steady
    stream of requests of every priority; the page is shot once the cloud worker has registered
    and is still cold or loading (or ready, if it was too quick to catch)."""
    import tempfile

    from cicada.testing import make_assets, tiny_gpt2_config

    work = Path(tempfile.mkdtemp(prefix="live-page-"))
    config = {**tiny_gpt2_config(), "n_layer": 12, "n_embd": 768, "n_head": 12}
    assets = make_assets(work / "assets", config)
    stop = threading.Event()
    with Stack(work) as stack:
        stack.coordinator()
        stack.edge("gpt2", assets["edge"], name="edge-a")
        stack.wait_workers("edge", timeout=WAIT_S)
        base = stack.metrics_url.rsplit("/", 1)[0]

        def traffic() -> None:
            x = np.load(assets["input"])
            with Client(stack.address, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    with contextlib.suppress(Exception):  # a refusal shows on the page
                        client.invoke("gpt2", x, priority=(0, 1, 2)[i % 3])
                    i += 1
                    time.sleep(0.05)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        time.sleep(3)
        stack.cloud("gpt2", assets["package"], name="cloud-a")
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with urllib.request.urlopen(base + "/status.json", timeout=10) as r:
                workers = json.loads(r.read())["models"][0]["workers"]
            clouds = [w for w in workers if w["role"] == "cloud"]
            if clouds and clouds[0]["state"] != "ready":
                break  # registered, still cold or loading
            time.sleep(0.05)
        headless(base + "/", work / "profile", f"--screenshot={out.resolve()}",
                 "--window-size=1280,900")  # fmt: skip
        stop.set()
        thread.join(30)
    print(f"wrote {out}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=screenshot.__doc__)
    parser.add_argument("--screenshot", type=Path, required=True)
    screenshot(parser.parse_args().screenshot)
