"""`cicada status`: read a coordinator's /metrics and show it. Torch-free."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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


def render_status(snapshot: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    workers = Table(title="workers")
    for col in ("model", "role", "state", "count"):
        workers.add_column(col)
    for w in snapshot["workers"]:
        workers.add_row(w["model"], w["role"], w["state"], str(w["count"]))
    console.print(workers)
    requests = Table(title="requests answered")
    for col in ("model", "route", "status", "count"):
        requests.add_column(col)
    for r in snapshot["requests"]:
        requests.add_row(r["model"], r["route"], r["status"], str(r["count"]))
    console.print(requests)
    queued = [q for q in snapshot["queues"] if q["depth"]]
    console.print(
        f"queued now: {sum(q['depth'] for q in queued)}; malformed dropped: "
        f"{snapshot['malformed']}; late results discarded: {snapshot['late_results']}"
    )
