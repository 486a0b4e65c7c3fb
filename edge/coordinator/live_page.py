"""The coordinator's live page: `/` (one self-contained HTML document, its script and style
inline, nothing fetched from elsewhere) and `/status.json` (what it draws, docs/STATUS.md);
every other path is the Prometheus app, as before. Served by common/httpd.py with /metrics.

Names in the JSON come from peers (workers register them): the script writes them only as
text (`textContent`), and the Content-Security-Policy allows no script but the page's own and
no connection but to this origin.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from cicada.edge.coordinator.live import LiveStatus

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_COMMON_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def live_app(live: LiveStatus, fallback: WsgiApp) -> WsgiApp:
    """A WSGI app: the page at `/`, its JSON at `/status.json`, anything else to `fallback`."""
    page = PAGE.encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/", "/index.html", "/status.json"):
            return fallback(environ, start_response)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), *_COMMON_HEADERS])
            return [b""]
        if path == "/status.json":
            body = json.dumps(live.snapshot(), allow_nan=False, separators=(",", ":")).encode()
            kind = "application/json"
            headers = _COMMON_HEADERS
        else:
            body, kind = page, "text/html; charset=utf-8"
            headers = [*_COMMON_HEADERS, ("Content-Security-Policy", CSP)]
        start_response(
            "200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))), *headers]
        )
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cicada coordinator</title>
<style>
  :root { --edge: #2a7ab8; --cloud: #c0622a; --ok: #2e8b57; --bad: #b83232; --muted: #777; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem 1.5rem; color: #222;
         background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
  h3 { font-size: .95rem; margin: .8rem 0 .3rem; color: #444; }
  #meta { color: var(--muted); margin-bottom: 1rem; }
  #meta.stale { color: var(--bad); font-weight: 600; }
  .model { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem;
           margin-bottom: 1rem; }
  .cols { display: flex; flex-wrap: wrap; gap: 1.5rem; }
  table { border-collapse: collapse; }
  th, td { text-align: left; padding: .15rem .6rem .15rem 0; white-space: nowrap; }
  th { color: var(--muted); font-weight: 500; border-bottom: 1px solid #ddd; }
  .bar { display: inline-block; width: 140px; height: 10px; background: #e6e6e6;
         border-radius: 3px; vertical-align: middle; overflow: hidden; }
  .bar > span { display: block; height: 100%; }
  .role-edge .bar > span, .route-edge { background: var(--edge); }
  .role-cloud .bar > span, .route-cloud { background: var(--cloud); }
  .tag { display: inline-block; padding: 0 .35rem; border-radius: 3px; color: #fff;
         font-size: 12px; }
  .route-none { background: var(--muted); }
  .status-OK { color: var(--ok); } .status-bad { color: var(--bad); font-weight: 600; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  .muted { color: var(--muted); }
  svg.chart { background: #fcfcfc; border: 1px solid #e4e4e4; display: block; }
</style>
</head>
<body>
<h1>Cicada coordinator</h1>
<div id="meta">loading <a href="status.json">status.json</a>…</div>
<noscript>This page draws <a href="status.json">status.json</a> with a script; without
scripts, read that document.</noscript>
<div id="models"></div>
<section id="recent-section">
  <h2>Last requests</h2>
  <table id="recent"><thead><tr><th>ago</th><th>model</th><th>priority</th><th>served by</th>
  <th>worker</th><th>status</th><th class="num">latency</th></tr></thead><tbody></tbody></table>
</section>
<script>
"use strict";
const PRIORITY = {0: "0 critical", 1: "1 normal", 2: "2 quality"};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;  // text only ever goes in as text nodes: names come from peers
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}

function residency(w) {
  const cell = el("td", {class: "residency"});
  let share, text;
  if (w.total_stages > 0) {
    share = w.resident_stages / w.total_stages;
    text = w.resident_stages + "/" + w.total_stages + " stages";
    if (w.read_stages > w.resident_stages) text += " (" + w.read_stages + " read)";
  } else {
    share = w.state === "ready" ? 1 : 0;  // an edge agent loads one file: no stages to count
    text = w.state === "ready" ? "loaded" : "–";
  }
  const fill = el("span");
  fill.style.width = (100 * Math.max(0, Math.min(1, share))).toFixed(1) + "%";
  cell.append(el("span", {class: "bar"}, fill), " ", el("span", {class: "stages"}, text));
  return cell;
}

function workersTable(model) {
  const table = el("table", {class: "workers"});
  table.append(el("thead", {}, el("tr", {}, ...["worker", "role", "state", "residency", "ETA",
    "busy"].map(h => el("th", {}, h)))));
  const body = el("tbody");
  for (const w of model.workers) {
    body.append(el("tr", {class: "worker role-" + w.role, "data-name": w.name, "data-role": w.role},
      el("td", {class: "name"}, w.name),
      el("td", {class: "role"}, w.role),
      el("td", {class: "state"}, w.state +
        (w.phase && w.state !== "ready" ? " · " + w.phase + " " + seconds(w.phase_s) : "")),
      residency(w),
      el("td", {class: "eta num"}, w.state === "ready" ? "–" : seconds(w.eta_s)),
      el("td", {class: "busy num"}, w.busy + "/" + w.capacity)));
  }
  if (!model.workers.length) body.append(el("tr", {}, el("td", {colspan: 6, class: "muted"},
    "no worker registered")));
  if (model.workers_omitted) body.append(el("tr", {}, el("td", {colspan: 6, class: "muted"},
    "and " + model.workers_omitted + " more")));
  table.append(body);
  return table;
}

function queuesTable(model) {
  const table = el("table", {class: "queues"});
  table.append(el("thead", {}, el("tr", {}, el("th", {}, "priority"), el("th", {class: "num"},
    "queued"))));
  const body = el("tbody");
  for (const p of [0, 1, 2]) {
    const depth = model.queues[String(p)] || 0;
    body.append(el("tr", {class: "queue", "data-priority": p}, el("td", {}, PRIORITY[p]),
      el("td", {class: "num depth"}, depth)));
  }
  table.append(body);
  return table;
}

function chart(series) {
  const W = 300, H = 90, L = 44, B = 16;
  const box = svg("svg", {class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
                          "data-route": series.route});
  const pts = series.points;
  const span = Math.max(10, ...pts.map(p => p[0])) * 1.02;  // the points kept, oldest at left
  const top = Math.max(1e-4, ...pts.map(p => p[1])) * 1.1;
  const x = age => L + (W - L - 6) * (1 - age / span);
  const y = s => (H - B) - (H - B - 6) * (s / top);
  for (const [label, v] of [[seconds(top), top], ["0", 0]]) {
    const t = svg("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10,
                           fill: "#777"});
    t.textContent = label;
    box.append(t);
  }
  const axis = svg("text", {x: W - 6, y: H - 3, "text-anchor": "end", "font-size": 10,
                            fill: "#777"});
  axis.textContent = "last " + Math.round(span) + " s";
  box.append(axis);
  const colour = series.route === "cloud" ? "#c0622a" : "#2a7ab8";
  if (series.p50_s !== null) box.append(svg("line", {x1: L, x2: W - 6, y1: y(series.p50_s),
    y2: y(series.p50_s), stroke: colour, "stroke-dasharray": "3 3", "stroke-width": 1}));
  if (pts.length > 1) box.append(svg("polyline", {fill: "none", stroke: colour, "stroke-width": 1,
    points: pts.map(p => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ")}));
  for (const p of pts) box.append(svg("circle", {cx: x(p[0]), cy: y(p[1]), r: 1.8, fill: colour}));
  return box;
}

function latencyBlock(model) {
  const block = el("div", {class: "latency"});
  if (!model.latency.length) block.append(el("div", {class: "muted"}, "no answered request yet"));
  for (const s of model.latency) {
    block.append(el("div", {class: "series", "data-route": s.route},
      el("span", {class: "tag route-" + s.route}, s.route), " ",
      el("span", {class: "muted"}, "p50 " + seconds(s.p50_s) + " · p99 " + seconds(s.p99_s) +
        " · last " + s.count)), chart(s));
  }
  return block;
}

function modelCard(model) {
  return el("section", {class: "model", "data-model": model.name},
    el("h2", {}, model.name),
    el("div", {class: "cols"},
      el("div", {}, el("h3", {}, "workers"), workersTable(model)),
      el("div", {}, el("h3", {}, "queues"), queuesTable(model)),
      el("div", {}, el("h3", {}, "latency of answered requests"), latencyBlock(model))));
}

function recentRow(r) {
  const bad = r.status !== "OK";
  return el("tr", {class: "request", "data-route": r.route, "data-status": r.status},
    el("td", {class: "num"}, r.age_s.toFixed(1) + " s"),
    el("td", {class: "req-model"}, r.model),
    el("td", {}, r.priority === null ? "–" : PRIORITY[r.priority] || r.priority),
    el("td", {}, el("span", {class: "tag route route-" + r.route}, r.route)),
    el("td", {class: "worker"}, (r.worker || "–") + (r.handed_off ? " (handed off)" : "")),
    el("td", {class: "status " + (bad ? "status-bad" : "status-OK")}, r.status),
    el("td", {class: "num latency"}, seconds(r.latency_s)));
}

function render(s) {
  const models = document.getElementById("models");
  models.replaceChildren(...s.models.map(modelCard));
  if (!s.models.length) models.append(el("p", {class: "muted"}, "no model known yet"));
  if (s.models_omitted) models.append(el("p", {class: "muted"}, "and " + s.models_omitted +
    " more models"));
  const body = document.querySelector("#recent tbody");
  body.replaceChildren(...s.recent.map(recentRow));
  const meta = document.getElementById("meta");
  meta.className = "";
  meta.textContent = "up " + Math.round(s.uptime_s) + " s · updated " +
    new Date().toLocaleTimeString() + " · the last " + s.limits.recent + " requests";
}

async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    const meta = document.getElementById("meta");
    meta.className = "stale";
    meta.textContent = "cannot read status.json (" + e.message + "); retrying";
  }
  setTimeout(refresh, 1000);
}
refresh();
</script>
</body>
</html>
"""
