"""`cicada status`: read a coordinator's /metrics and /status.json and show them. Torch-free.

`/metrics` gives the outcome counts since the coordinator started; `/status.json` (the live
page's document, docs/STATUS.md) each worker's residency and ETA, the queues by priority and the
latency of the last answered requests per model and route."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cicada.common.defaults import PRIORITIES
from cicada.common.errors import CicadaError

# Per worker, under snapshot["residency"][name] (without the prefix), with "phase" its label.
_RESIDENCY = frozenset(
    f"cicada_worker_{name}"
    for name in ("resident_stages", "total_stages", "eta_seconds", "read_stages", "read_bytes",
                 "total_bytes", "phase_seconds")
)  # fmt: skip


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise CicadaError(
            f"cannot read {url}: {exc}; is the coordinator running with --metrics?"
        ) from None
    snapshot: dict[str, Any] = {
        "workers": [],
        "queues": [],
        "requests": [],
        "malformed": 0,
        "late_results": 0,
        "superseded": 0,
        "violations": 0,
        "client_backlog": 0,
        "replies_discarded": 0,
        "clients_dropped": 0,
        "dropped": {},
        "latency": [],
        "residency": {},
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels, value = s.labels, s.value
            if s.name == "cicada_workers" and value:
                snapshot["workers"].append({**labels, "count": int(value)})
            elif s.name in _RESIDENCY:
                entry = snapshot["residency"].setdefault(labels["worker"], {"role": labels["role"]})
                entry[s.name.removeprefix("cicada_worker_")] = value
                if "phase" in labels:  # cicada_worker_phase_seconds
                    entry["phase"] = labels["phase"]
            elif s.name == "cicada_queue_depth":
                snapshot["queues"].append({**labels, "depth": int(value)})
            elif s.name == "cicada_requests_total":
                snapshot["requests"].append({**labels, "count": int(value)})
            elif s.name == "cicada_malformed_messages_total":
                snapshot["malformed"] = int(value)
            elif s.name == "cicada_requests_dropped_total":
                snapshot["dropped"][labels["reason"]] = int(value)
            elif s.name == "cicada_late_results_total":
                snapshot["late_results"] = int(value)
            elif s.name == "cicada_superseded_messages_total":
                snapshot["superseded"] += int(value)
            elif s.name == "cicada_worker_violations_total":
                snapshot["violations"] = int(value)
            elif s.name == "cicada_client_backlog_messages":
                snapshot["client_backlog"] = int(value)
            elif s.name == "cicada_replies_discarded_total":
                snapshot["replies_discarded"] += int(value)
            elif s.name == "cicada_clients_dropped_total":
                snapshot["clients_dropped"] = int(value)
            elif s.name in ("cicada_request_seconds_count", "cicada_request_seconds_sum"):
                snapshot["latency"].append({**labels, s.name.rsplit("_", 1)[1]: value})
    return snapshot


MAX_STATUS_BYTES = 8 * 1024 * 1024  # a status document is tens of KiB; more is not one


def live_url(metrics_url: str) -> str:
    """/status.json beside the given /metrics URL (same scheme, host and port)."""
    parts = urllib.parse.urlsplit(metrics_url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/status.json", "", ""))


def fetch_live(metrics_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The coordinator's /status.json, checked to be one (CicadaError, saying why, if not)."""
    url = live_url(metrics_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(MAX_STATUS_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise CicadaError(f"cannot read {url}: {exc}") from None
    try:
        document = json.loads(body) if len(body) <= MAX_STATUS_BYTES else None
    except (ValueError, RecursionError):  # (nesting deeper than the parser's stack)
        document = None
    if not _is_status(document):
        raise CicadaError(f"{url} is not a Cicada status document (an older coordinator?)")
    assert isinstance(document, dict)
    return document


def _is_status(document: Any) -> bool:
    """The shape render_live reads (docs/STATUS.md): anything else is not shown."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        return False
    for model in document["models"]:
        if not (
            isinstance(model, dict)
            and isinstance(model.get("name"), str)
            and isinstance(model.get("workers"), list)
            and isinstance(model.get("queues"), dict)
            and isinstance(model.get("latency"), list)
            and all(_is_worker(w) for w in model["workers"])
            and all(isinstance(v, int) for v in model["queues"].values())
            and all(_is_series(s) for s in model["latency"])
        ):
            return False
    return True


def _is_worker(w: Any) -> bool:
    return (
        isinstance(w, dict)
        and all(isinstance(w.get(k), str) for k in ("name", "role", "state"))
        and all(isinstance(w.get(k), int) for k in ("resident_stages", "total_stages"))
        and all(isinstance(w.get(k), int) for k in ("busy", "capacity"))
        and _number_or_none(w.get("eta_s"))
    )


def _is_series(s: Any) -> bool:
    return (
        isinstance(s, dict)
        and isinstance(s.get("route"), str)
        and isinstance(s.get("count"), int)
        and _number_or_none(s.get("p50_s"))
        and _number_or_none(s.get("p99_s"))
    )


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _cells(*values: Any) -> list[Any]:
    """Table cells as plain text: names come from peers, and rich would read `[...]` in them
    as markup (Text also strips terminal control codes)."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _residency(w: dict[str, Any], width: int = 10) -> str:
    """`3/5 ██████░░░░`: stages resident of total; an edge agent has none to count."""
    total, resident = w["total_stages"], w["resident_stages"]
    if total <= 0:
        return "loaded" if w["state"] == "ready" else "–"
    filled = round(width * max(0, min(resident, total)) / total)
    return f"{resident}/{total} " + "█" * filled + "░" * (width - filled)


def _counts(title: str, labels: tuple[str, ...], samples: list[dict[str, Any]]) -> Any:
    """A table of counted /metrics samples: their labels, then the count."""
    from rich.table import Table

    table = Table(title=title)
    for col in (*labels, "count"):
        table.add_column(col)
    for sample in samples:
        table.add_row(*_cells(*(sample[k] for k in labels), sample["count"]))
    return table


def render_status(snapshot: dict[str, Any], live: dict[str, Any] | None = None) -> None:
    """The table view: from `live` (/status.json) each worker's residency and ETA, the queues
    by priority and the latency percentiles; from `snapshot` (/metrics) the outcome counts.
    Without `live`, the worker counts /metrics gives."""
    from rich.console import Console

    console = Console()
    if live is None:
        console.print(_counts("workers", ("model", "role", "state"), snapshot["workers"]))
    else:
        render_live(console, live)
    console.print(_counts("requests answered", ("model", "route", "status"), snapshot["requests"]))
    queued = [q for q in snapshot["queues"] if q["depth"]]
    console.print(
        f"queued now: {sum(q['depth'] for q in queued)}; malformed dropped: "
        f"{snapshot['malformed']}; late results discarded: {snapshot['late_results']}"
    )


def render_live(console: Any, live: dict[str, Any]) -> None:
    """Workers (residency, ETA, busy slots), queues by priority, latency by model and route."""
    from rich.table import Table

    workers = Table(title="workers")
    for col in ("model", "worker", "role", "state", "residency", "ETA", "busy"):
        workers.add_column(col, no_wrap=col in ("residency", "ETA", "busy"))
    queues = Table(title="queued, by priority")
    for col in ("model", "0 critical", "1 normal", "2 quality"):
        queues.add_column(col, justify="left" if col == "model" else "right")
    latency = Table(title="latency of the last answered requests")
    for col in ("model", "route", "requests", "p50", "p99"):
        latency.add_column(col, justify="left" if col in ("model", "route") else "right")
    for model in live["models"]:
        name = model["name"]
        for w in model["workers"]:
            eta = "–" if w["state"] == "ready" else _seconds(w["eta_s"])
            workers.add_row(*_cells(name, w["name"], w["role"], w["state"], _residency(w), eta,
                                    f"{w['busy']}/{w['capacity']}"))  # fmt: skip
        queues.add_row(*_cells(name, *(model["queues"].get(str(p), 0) for p in PRIORITIES)))
        for s in model["latency"]:
            latency.add_row(*_cells(name, s["route"], s["count"], _seconds(s["p50_s"]),
                                    _seconds(s["p99_s"])))  # fmt: skip
    console.print(workers)
    console.print(queues)
    if latency.row_count:
        console.print(latency)
