"""The handoff benchmark's targets and its report on the console."""

from __future__ import annotations

from typing import Any

from benchmarks.handoff.bound import TARGET_REACHED_OF_BOUND
from benchmarks.handoff.common import (
    CLASSES,
    TARGETS,
    fmt_pct,
    fmt_s,
    integrity_ok,
    median,
    ratio,
    verdict,
)

# -- targets and reporting ---------------------------------------------------------------------


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    pol = results["policies"]
    coop, edge = pol["cooperative"], pol["edge-only"]
    over = results["coordinator"]["overhead"]
    peak = max(results["coordinator"]["throughput"], key=lambda t: t["requests_per_s"])
    lean = results["coordinator"].get("throughput_stand_in") or [{"requests_per_s": 0.0}]
    lean_peak = max(lean, key=lambda t: t["requests_per_s"])
    p99_ratio = ratio(coop["latency_ok"]["p99_s"], edge["latency_ok"]["p99_s"])
    share = coop["large_share_after_ready"]
    every = [p["integrity"] for p in pol.values()]
    every += [t["integrity"] for t in results["coordinator"]["throughput"]]
    every += [t["integrity"] for t in results["coordinator"].get("throughput_stand_in", [])]
    lost = sum(c["lost"] for c in every)
    dup = sum(c["duplicates"] for c in every)
    sent = sum(c["sent"] for c in every)
    outcomes = sum(c["outcomes"] for c in every)
    return [
        {
            "target": "coordinator overhead p50 <= 300 µs",
            "measured": f"{over['overhead_p50_s'] * 1e6:.0f} µs "
            f"(p99 {over['overhead_p99_s'] * 1e6:.0f} µs; a zero-logic relay in its place adds "
            f"{(over.get('relay_overhead_p50_s') or 0) * 1e6:.0f} µs p50)",
            "pass": over["overhead_p50_s"] * 1e6 <= TARGETS["overhead_p50_us"],
        },
        {
            "target": ">= 5,000 requests/s through one coordinator",
            "measured": f"{lean_peak['requests_per_s']:.0f} requests/s coordinator-bound "
            f"(stand-in agents and client in one process; coordinator core ceiling "
            f"{lean_peak.get('coordinator_core_ceiling_rps') or 0:.0f}); full stack "
            f"{peak['requests_per_s']:.0f} ({peak['agents']} `cicada edge` agent(s), SDK client)",
            "pass": lean_peak["requests_per_s"] >= TARGETS["throughput_rps"],
        },
        {
            "target": "cooperative p99 <= 1.1 x edge-only p99",
            "measured": f"{fmt_s(coop['latency_ok']['p99_s'])} vs "
            f"{fmt_s(edge['latency_ok']['p99_s'])} = "
            + ("-" if p99_ratio is None else f"{p99_ratio:.2f}x"),
            "pass": None if p99_ratio is None else p99_ratio <= TARGETS["cooperative_p99_vs_edge"],
        },
        {
            "target": "large model answers >= 80% of requests arriving after it is ready",
            "measured": f"{fmt_pct(share)} of {coop['arrived_after_ready']} "
            f"({fmt_pct(coop['large_share_after_ready_noncritical'])} of the non-critical ones; "
            f"at most {fmt_pct(coop.get('large_share_bound'))} possible here: cloud capacity "
            f"{fmt_pct(coop.get('cloud_capacity_share'))} of the offered rate, and critical "
            "requests go to the faster edge; "
            f"ready per coordinator metrics: {fmt_pct(coop['large_share_after_ready_metrics'])} "
            f"of {coop['arrived_after_ready_metrics']})",
            "pass": None if share is None else share >= TARGETS["large_share_after_ready"],
        },
        {
            "target": "every latency-critical request answered without waiting for a cold start",
            "measured": f"{coop['critical_waited_for_cold_start']} of {coop['critical']} "
            f"waited ({coop['critical_ok']} answered OK; edge-only "
            f"{pol['edge-only']['critical_ok']})",
            "pass": coop["critical_waited_for_cold_start"] == 0,
        },
        {
            "target": "zero lost or duplicated outcomes (sent == outcomes, unique ids)",
            "measured": f"sent {sent}, outcomes {outcomes}, lost {lost}, duplicated {dup}",
            "pass": lost == 0 and dup == 0 and sent == outcomes,
        },
    ]


def _bound_rows(label: str, bound: dict[str, Any] | None, comp: dict[str, Any],
                reached_target: float, what_if: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Targets against what the hardware allows, for one cooperative run."""
    rows: list[dict[str, Any]] = []
    if bound is not None:
        r = bound["reached_of_bound"]
        rows.append({
            "target": f"{label}: large-model share after ready >= {reached_target:.0%} of the "
            "capacity bound" if not what_if else f"{label}: large-model share after ready >= 80%",
            "measured": f"reached {fmt_pct(bound['reached'])} of {bound['after_ready']}, bound "
            f"{fmt_pct(bound['bound'])} (capacity {bound['cloud_capacity_requests']:.1f} answers "
            f"= batch {bound['batch']} x (window / {fmt_s(bound['service_s'])} + 1) per burst; "
            f"{bound['prefer_cloud']} prefer the cloud) -> reached/bound "
            + ("-" if r is None else f"{r:.2f}"),
            "pass": (None if r is None else r >= reached_target) if not what_if
            else (None if bound["reached"] is None
                  else bound["reached"] >= TARGETS["large_share_after_ready"]),
        })  # fmt: skip
    crit = comp["critical_p99_ratio"]
    rows.append({
        "target": f"{label}: latency-critical p99 <= 1.1 x edge-only's (same run)",
        "measured": f"{fmt_s(comp['critical_p99_s']['cooperative'])} vs "
        f"{fmt_s(comp['critical_p99_s']['edge_only'])} = "
        + ("-" if crit is None else f"{crit:.2f}x"),
        "pass": comp["critical_p99_ok"],
    })  # fmt: skip
    if what_if:
        over = comp["overall_p99_ratio"]
        rows.append({
            "target": f"{label}: overall p99 <= 1.1 x edge-only's (same run)",
            "measured": "-" if over is None else f"{over:.2f}x",
            "pass": None if over is None else over <= TARGETS["cooperative_p99_vs_edge"],
        })  # fmt: skip
    att = comp["attainment_by_class"]
    rows.append({
        "target": f"{label}: deadline attainment never worse than edge-only, any class",
        "measured": "; ".join(
            f"{cls} {fmt_pct(v['cooperative'])} vs {fmt_pct(v['edge_only'])}"
            for cls, v in att.items()
        ),
        "pass": comp["never_worse"],
    })  # fmt: skip
    return rows


def bound_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets judged against what the hardware allows (capacity bound, same-run ratios),
    for the cooperative run and, when it ran, the what-if."""
    rows: list[dict[str, Any]] = []
    if "comparison" in results:
        coop = results["policies"]["cooperative"]
        rows += _bound_rows("cooperative", coop.get("capacity_bound"), results["comparison"],
                            TARGET_REACHED_OF_BOUND, what_if=False)  # fmt: skip
    w = results.get("what_if")
    if w:
        rows += _bound_rows("WHAT-IF", w["capacity_bound"], w["comparison"],
                            TARGET_REACHED_OF_BOUND, what_if=True)  # fmt: skip
    return rows


def print_bounds(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    rows = results.get("bound_targets") or []
    if not rows:
        return
    table = Table(title="A. against what the hardware allows (cooperative vs edge-only, same run)")
    for col in ("target", "measured", "verdict"):
        table.add_column(col)
    for t in rows:
        table.add_row(t["target"], t["measured"], verdict(t["pass"]))
    console.print(table)
    console.print(
        "[dim]capacity bound = min(N_pref, C) / N; C = sum over bursts of B x (W / t_s + 1): "
        "B the cloud's batch capacity, t_s its median forward after ready, W last arrival - "
        "ready; N requests after ready, N_pref those preferring the cloud (all if the cloud "
        "forward is no slower than the edge's, else the non-critical ones).[/]"
    )
    w = results.get("what_if")
    if w:
        s = w["summary"]
        console.print(
            f"[bold]{w['label']}[/]: {w['note']}. p50 {fmt_s(s['latency_ok']['p50_s'])}, p99 "
            f"{fmt_s(s['latency_ok']['p99_s'])}, large model {fmt_pct(s['large_share'])} "
            f"({fmt_pct(s['large_share_after_ready'])} of {s['arrived_after_ready']} after "
            f"ready), statuses {s['statuses']}"
        )


def print_rounds(results: dict[str, Any], console: Any) -> None:
    """With --rounds: each round judged alone, beside the pooled verdicts above."""
    from rich.table import Table

    rounds = results.get("rounds") or []
    if not rounds:
        return
    table = Table(title="A. each round alone (the verdicts above pool every round's requests)")
    for col in (
        "round",
        "critical p99 coop / edge-only",
        "never worse",
        "reached/bound",
        "edge forward (median) coop / edge-only",
        "WHAT-IF critical / overall p99",
    ):
        table.add_column(col, justify="right")
    for r in rounds:
        p99, edge = r["critical_p99_s"], r["edge_compute_median_s"]
        crit, reached, w = r["critical_p99_ratio"], r["reached_of_bound"], r.get("what_if")
        table.add_row(
            str(r["round"] + 1),
            f"{fmt_s(p99['cooperative'])} / {fmt_s(p99['edge_only'])} = "
            + ("-" if crit is None else f"{crit:.2f}x"),
            verdict(r["never_worse"]),
            "-" if reached is None else f"{reached:.2f}",
            f"{fmt_s(edge['cooperative'])} / {fmt_s(edge['edge_only'])}",
            "-" if w is None else " / ".join(
                "-" if x is None else f"{x:.2f}x"
                for x in (w["critical_p99_ratio"], w["overall_p99_ratio"])
            ),
        )  # fmt: skip
    console.print(table)


def print_report(results: dict[str, Any], console: Any) -> None:
    if "policies" in results:
        print_policies(results, console)
        print_bounds(results, console)
        print_rounds(results, console)
    if results["coordinator"] is not None:
        print_coordinator(results["coordinator"], console)
        print_logic(results["coordinator"].get("logic", {}), console)
    print_targets(results, console)


def print_policies(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"A. policies on a bursty trace — {results['config']['trace_description']}")
    for col in ("policy", "sent", "OK", "p50", "p99", "attainment", "large model",
                "after ready", "critical waited", "cold start (med)", "retries",
                "others' cores"):  # fmt: skip
        table.add_column(col, justify="right")
    for policy, s in results["policies"].items():
        cold = [b["cold_start_s"] for b in s["bursts"] if b.get("cold_start_s") is not None]
        table.add_row(
            policy, str(s["integrity"]["sent"]), str(s["statuses"].get("OK", 0)),
            fmt_s(s["latency_ok"]["p50_s"]), fmt_s(s["latency_ok"]["p99_s"]),
            fmt_pct(s["deadline_attainment"]), fmt_pct(s["large_share"]),
            f"{fmt_pct(s['large_share_after_ready'])} of {s['arrived_after_ready']} "
            f"({fmt_pct(s['large_share_after_ready_metrics'])} of "
            f"{s['arrived_after_ready_metrics']})",
            f"{s['critical_waited_for_cold_start']} of {s['critical']}",
            fmt_s(median(cold)), str(s["retries"]),
            "-" if s["cpu"]["other_busy_cores"] is None else f"{s['cpu']['other_busy_cores']:.2f}",
        )  # fmt: skip
    console.print(table)
    classes = Table(title="A. per class (OK replies): p50 / p99, deadline met, large model")
    classes.add_column("policy")
    for cls, (priority, deadline) in CLASSES.items():
        classes.add_column(f"{cls} (p{priority}, {deadline:g} s)", justify="right")
    for policy, s in results["policies"].items():
        cells = []
        for cls in CLASSES:
            c = s["by_class"][cls]
            cells.append(
                f"{fmt_s(c['p50_s'])} / {fmt_s(c['p99_s'])}; met {c['attained']}/{c['sent']}; "
                f"cloud {c['cloud']}"
            )
        classes.add_row(policy, *cells)
    console.print(classes)
    coop = results["policies"]["cooperative"]
    cap = coop.get("cloud_capacity_share")
    if cap is not None:
        console.print(
            f"Cloud compute (median, cooperative) {fmt_s(coop['cloud_compute_median_s'])} per "
            f"request at capacity 1 -> at most {1 / coop['cloud_compute_median_s']:.1f} req/s, "
            f"{fmt_pct(cap)} of the offered {results['config']['rate']:g} req/s; edge compute "
            f"(median) {fmt_s(coop['edge_compute_median_s'])}."
        )


def print_coordinator(coordinator: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    over = coordinator["overhead"]
    lat = Table(title="B1. added latency, one request in flight (same agent process, rounds "
                      "alternated)")  # fmt: skip
    for col in ("path", "n", "p50", "p90", "p99", "p50 per round"):
        lat.add_column(col, justify="right")
    for label, key in (("direct (stand-in ROUTER)", "direct"),
                       ("via a zero-logic relay (raw DEALER)", "relay"),
                       ("via coordinator (raw DEALER)", "via_coordinator"),
                       ("via coordinator (SDK Client)", "sdk_client")):  # fmt: skip
        s = over.get(key)
        if s is None:
            continue
        lat.add_row(label, str(s["n"]), fmt_s(s["p50_s"]), fmt_s(s["p90_s"]), fmt_s(s["p99_s"]),
                    ", ".join(fmt_s(v) for v in s["per_round_p50_s"]))  # fmt: skip
    lat.add_row("coordinator overhead", "", fmt_s(over["overhead_p50_s"]), "",
                fmt_s(over["overhead_p99_s"]),
                ", ".join(fmt_s(v) for v in over["overhead_p50_per_round_s"]))  # fmt: skip
    if over.get("relay"):
        lat.add_row("relay overhead (the hop alone)", "", fmt_s(over["relay_overhead_p50_s"]), "",
                    fmt_s(over["relay_overhead_p99_s"]), "")  # fmt: skip
    console.print(lat)
    cpu = over["cpu_us_per_request"]

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} µs"

    via_cpu = cpu["via_coordinator"]
    console.print(
        f"CPU per sequential request: coordinator {us(via_cpu.get('coordinator'))} "
        f"(Python threads {us(via_cpu.get('coordinator:python'))}, libzmq I/O thread "
        f"{us(via_cpu.get('coordinator:zmq'))}); agent {us(cpu['direct'].get('agent'))} direct / "
        f"{us(cpu['via_coordinator'].get('agent'))} via the coordinator; this script "
        f"{us(cpu['direct'].get('benchmark'))} / {us(cpu['via_coordinator'].get('benchmark'))}."
    )

    tp = Table(title="B2. peak throughput, tiny payloads (Identity float32 [1,16])")
    for col in ("agents x cap", "clients x window", "requests/s", "p50", "p99",
                "CPU µs/req: coordinator", "agents", "clients", "others' cores",
                "sent=outcomes"):  # fmt: skip
        tp.add_column(col, justify="right")
    for t in coordinator["throughput"]:
        per = t["cpu_us_per_request"]
        agents_us = sum(v or 0.0 for k, v in per.items() if k.startswith("agent") and ":" not in k)
        c = t["integrity"]
        tp.add_row(
            f"{t['agents']} x {t['agent_capacity']}", f"{t['clients']} x {t['window_per_client']}",
            f"{t['requests_per_s']:.0f}", fmt_s(t["latency_p50_s"]), fmt_s(t["latency_p99_s"]),
            "-" if per.get("coordinator") is None else f"{per['coordinator']:.0f}",
            f"{agents_us:.0f}", "-" if per.get("clients") is None else f"{per['clients']:.0f}",
            "-" if t["other_busy_cores"] is None else f"{t['other_busy_cores']:.2f}",
            f"{c['sent']}={c['outcomes']}" + ("" if integrity_ok(c) else " !"),
        )  # fmt: skip
    console.print(tp)
    for t in coordinator.get("throughput_stand_in", []):
        per = t["cpu_us_per_request"]
        c = t["integrity"]
        console.print(
            f"  coordinator-bound (stand-in agents {t['agents']} x {t['agent_capacity']} and "
            f"client, window {t['window']}, one process): {t['requests_per_s']:.0f} requests/s; "
            f"CPU µs/request: coordinator {per['coordinator']:.0f} (ceiling on one core "
            f"{t['coordinator_core_ceiling_rps']:.0f} req/s), load generator "
            f"{per['load generator']:.0f}; others' cores {t['other_busy_cores']:.2f}; "
            f"sent=outcomes {c['sent']}={c['outcomes']}" + ("" if integrity_ok(c) else " !")
        )
    for t in coordinator["throughput"]:
        per = t["cpu_us_per_request"]
        if per.get("coordinator:python") is not None:
            console.print(
                f"  {t['agents']} agent(s), window {t['window_per_client']}: coordinator CPU "
                f"{per['coordinator']:.0f} µs/request = Python threads "
                f"{per['coordinator:python']:.0f} + libzmq I/O thread {per['coordinator:zmq']:.0f}"
            )
    for t in coordinator["throughput"]:
        prof = t.get("profile")
        if prof:
            pt = Table(
                title=f"py-spy, coordinator main thread at {t['requests_per_s']:.0f} req/s "
                f"({prof['idle_in_poll_share']:.0%} of its samples idle in zmq poll)"
            )
            pt.add_column("function (inclusive, from the serving loop down)")
            pt.add_column("share of busy samples", justify="right")
            pt.add_column("CPU µs/request", justify="right")
            for row in prof["inclusive_top"][:20]:
                us = row["us_per_request"]
                pt.add_row(
                    row["function"],
                    f"{row['share_of_busy']:.1%}",
                    "-" if us is None else f"{us:.0f}",
                )
            console.print(pt)


def print_logic(logic: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if logic.get("error"):
        console.print(f"B3 failed: {logic['error']}")
    rows = logic.get("by_backlog", [])
    if not rows:
        return
    table = Table(
        title="B3. coordinator logic in process (no sockets): CPU µs per request, 2 agents x 4 "
        "slots busy, N requests queued"
    )
    for col in ("queued", "total", "RESULT in", "dispatch after it", "REQUEST in",
                "dispatch after it", "ceiling (1 core)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        ph = r["phases_us"]
        table.add_row(
            str(r["queued"]), f"{r['cpu_us_per_request']:.0f}", f"{ph['result_in']:.0f}",
            f"{ph['dispatch_after_result']:.0f}", f"{ph['request_in']:.0f}",
            f"{ph['dispatch_after_request']:.0f}",
            f"{1e6 / r['cpu_us_per_request']:.0f} req/s",
        )  # fmt: skip
    console.print(table)
    base = rows[0]["cpu_us_per_request"]
    for key, label in (("profile_q0", "nothing queued"), ("profile_q128", "128 queued")):
        prof = logic.get(key)
        if not prof:
            continue
        queued = 0 if key == "profile_q0" else 128
        measured = [r["cpu_us_per_request"] for r in rows if r["queued"] == queued]
        cpu = measured[0] if measured else base
        pt = Table(
            title=f"B3. cProfile, {label}: cumulative share of the coordinator's time "
            f"(x {cpu:.0f} µs measured without the profiler)"
        )
        for col in ("function", "calls/request", "share", "≈ µs/request"):
            pt.add_column(col, justify="right" if col != "function" else "left")
        for row in prof["profile_cumulative_share"][:18]:
            pt.add_row(row["function"], f"{row['calls_per_request']:g}", f"{row['share']:.1%}",
                       f"{row['share'] * cpu:.0f}")  # fmt: skip
        console.print(pt)


def print_targets(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if not results["targets"]:
        return
    targets = Table(title="targets")
    for col in ("target", "measured", "verdict"):
        targets.add_column(col)
    for t in results["targets"]:
        targets.add_row(t["target"], t["measured"], verdict(t["pass"]))
    console.print(targets)
    for note in results["notes"]:
        console.print(f"[dim]note:[/] {note}")
