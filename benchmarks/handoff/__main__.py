#!/usr/bin/env python3
"""Handoff benchmark: routing policies on a bursty trace, and the coordinator's own cost.

    python3 -m benchmarks.handoff                       # GPT-2-medium, 3 bursts, 6 s throughput
    python3 -m benchmarks.handoff --quick               # tiny GPT-2, 1 short burst: a smoke test
    python3 -m benchmarks.handoff --rate 4 --out results/handoff-rate4

Every role is a real process (`python -m cicada coordinator|edge|cloud`, via cicada.testing's
Stack) on loopback ports; this script is only the load generator and the stopwatch. The parts
live beside this file: trace.py and policies.py (A), overhead.py (B), report.py, assets.py and
common.py (what they share).

A. Policies on a bursty trace. Bursts of Poisson arrivals with mixed priorities (30% critical:
   priority 0, deadline 0.5 s; 50% normal: 1, 2 s; 20% quality: 2, 5 s), sent open loop with
   `AsyncClient` at the trace times, through three deployments of the same coordinator:
   `cloud-only` (only a cloud worker; every request is sent as priority 2 with a long deadline
   so it waits for the cold start; attainment is still judged on the class deadline),
   `edge-only` (only the edge agent) and `cooperative` (both).
   Scale-to-zero is emulated HERE, not by the coordinator (the coordinator-driven lifecycle is
   a later issue): a fresh `cicada cloud` process is started at each burst's first request and
   stopped with SIGTERM once the burst is answered and a keep-alive has passed idle; bursts are
   separated by idle gaps longer than the keep-alive, so every burst meets a cold cloud. The
   cloud is "ready" when its log says "<model> resident" (the line follows the READY
   heartbeat it sends the coordinator). A client here follows `retry_after` on UNAVAILABLE
   (what a cloud-only caller sees before the cold worker has even registered), within the
   request's deadline; every attempt is a request of its own in the exactly-once count.
   Against what the hardware allows (bound.py), per run: the capacity bound, the share of the
   requests arriving after the cloud is ready that the measured cloud capacity and the mix
   allow, bound = min(N_pref, C) / N with C = sum over bursts of B * (W / t_s + 1) (B the
   cloud's batch capacity, t_s its median forward after ready, W last arrival - ready; N the
   requests after ready, N_pref those preferring the cloud: all when its forward is no slower
   than the edge's, else the non-critical ones), beside the share reached and reached/bound
   (target >= 0.95); the latency-critical p99 cooperative / edge-only (<= 1.1), and deadline
   attainment per class in both modes (cooperation never worse for any class).
   WHAT-IF (what_if.py, --no-what-if skips it): cooperative again, with the real coordinator and
   edge agent but a stand-in cloud worker process (standin_cloud.py: the wire protocol through
   WorkerRuntime; its forward sleeps a GPU profile's time, --gpu-profile JSON or a stated H100
   estimate) after the real cloud's measured cold start; the same figures, judged >= 80 % after
   ready and overall p99 <= 1.1 x edge-only. It is labelled WHAT-IF everywhere: no GPU runs.
B. The coordinator's own cost, with a trivial ONNX model (Identity, float32 [1, 16]) served by a
   `cicada edge` agent (capacity 4). (1) Added latency: the same agent process is measured
   through the coordinator and directly, alternating in rounds: for the direct path this script
   binds a minimal ROUTER on the coordinator's port that plays the coordinator (answers READY,
   sends DISPATCH, reads RESULT); the agent reconnects to whichever is bound. Both paths use the
   same raw DEALER code here (encode, send, receive, decode), one request in flight;
   overhead = p50(via coordinator) - p50(direct), and p99 likewise. The SDK `Client` is timed
   too, for reference, and so is a zero-logic relay in the coordinator's place (forwards with
   the command byte rewritten: the floor that the extra process and hops set). (2) Peak
   throughput with tiny payloads: `--clients` load-generator processes, each an `AsyncClient`
   with `--window` calls outstanding, against 1 and then 2 agents; requests/s over the
   measuring window, and each process's CPU time per request. Then coordinator-bound: a raw
   client and two stand-in echo agents in one lean process (`run_lean_throughput`), which is
   what the throughput target is judged on. (3) The coordinator's logic in process, no sockets.

Writes <out>/results.json (every request of part A, summaries, targets; `comparison`,
`policies.cooperative.capacity_bound`, `what_if` and `bound_targets` hold the figures against
what the hardware allows), <out>/what_if.png and <out>/handoff.png
(latency vs arrival time per policy, coloured by who answered, cloud start/ready/stop marked)
and <out>/overhead.png (latency distributions of part B). The machine is shared and noisy:
compare figures taken in the same run (ratios, differences), never a lone absolute time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.handoff.assets import gpt2_assets
from benchmarks.handoff.bound import compare_modes, run_capacity_bound
from benchmarks.handoff.common import (
    BURNERS,
    CLASSES,
    CLOUD_ONLY_DEADLINE_S,
    MIX,
    POLICIES,
    burner,
    fmt_pct,
    fmt_s,
    machine_info,
    wait_quiet,
)
from benchmarks.handoff.overhead import measure_coordinator, plot_overhead
from benchmarks.handoff.policies import PolicyOptions, large_share_bound, plot_policies, run_policy
from benchmarks.handoff.report import bound_targets, evaluate_targets, print_report
from benchmarks.handoff.rounds import compare_rounds, pool_summaries
from benchmarks.handoff.trace import make_trace
from benchmarks.handoff.what_if import WHAT_IF_LABEL, judge_what_if, run_what_if
from benchmarks.machine import ROOT, loadavg

# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, 1 short burst, 2 s throughput")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "handoff")
    p.add_argument("--cache", type=Path, default=None, help="package cache (default: CICADA_CACHE)")
    p.add_argument("--logs", type=Path, default=None,
                   help="keep every stack's work folder (coordinator, edge and cloud logs) here "
                        "(default: a temporary folder, removed)")  # fmt: skip
    p.add_argument("--bursts", type=int, default=None)
    p.add_argument("--burst-requests", type=int, default=None)
    p.add_argument(
        "--rounds", type=int, default=1,
        help="part A: run the policies (and the what-if) this many times, alternating them, and "
        "judge each policy on all its requests pooled (rounds.py: one run of each is two runs "
        "half a minute apart on a drifting machine); every round is also reported alone",
    )  # fmt: skip
    p.add_argument("--rate", type=float, default=20.0, help="arrivals per second within a burst")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per request")
    p.add_argument("--keepalive", type=float, default=None, help="idle seconds before SIGTERM")
    p.add_argument("--gap", type=float, default=None, help="idle seconds between bursts")
    p.add_argument(
        "--prime-gib", type=float, default=0.0,
        help="GiB of memory touched and freed before each burst (default 0: on a VM whose "
        "balloon reports freed memory to its host, the report ~2 s later stalls every vCPU in "
        "the middle of the burst; the cold start then pays the host's page faults instead)",
    )  # fmt: skip
    p.add_argument("--cloud-threads", type=int, default=None, help="torch threads (cloud)")
    p.add_argument(
        "--burner", choices=BURNERS, default=None,
        help="part A under load: another process busy on one core all along, pinned to the "
        "edge's cores, to the cloud's, or left free to the scheduler (default: none)",
    )  # fmt: skip
    p.add_argument("--edge-capacity", type=int, default=2)
    p.add_argument(
        "--no-pin", action="store_true",
        help="part A: do not pin the cloud worker to its own core (default: the last core is the "
        "cloud's, the others everyone else's, emulating a cloud on another machine)",
    )  # fmt: skip
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--gpu-profile", type=Path, default=None,
        help="what-if: JSON {\"service_s\": s, \"source\": \"...\"}, a cloud forward's time "
        "(default: standin_cloud.DEFAULT_PROFILE, a stated H100 estimate)",
    )  # fmt: skip
    p.add_argument("--no-what-if", action="store_true", help="skip the stand-in cloud what-if")
    p.add_argument(
        "--what-if-cold-start", type=float, default=None, metavar="S",
        help="the stand-in's cold start (default: the cooperative run's measured median)",
    )  # fmt: skip
    p.add_argument("--overhead-rounds", type=int, default=None)
    p.add_argument("--overhead-requests", type=int, default=None)
    p.add_argument("--overhead-warmup", type=int, default=200)
    p.add_argument("--clients", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--window", default="16,128", help="calls outstanding per client (comma list: a sweep)"
    )
    p.add_argument("--throughput-s", type=float, default=None)
    p.add_argument("--throughput-warmup", type=float, default=1.0)
    p.add_argument("--profile", action="store_true",
                   help="py-spy the coordinator during the 2-agent throughput run")  # fmt: skip
    p.add_argument("--skip-policies", action="store_true", help="part B only")
    p.add_argument("--skip-coordinator", action="store_true", help="part A only")
    p.add_argument(
        "--wait-quiet", type=float, default=None, metavar="LOAD",
        help="before each part, wait (<= 10 min) for the 1-min load average < LOAD",
    )  # fmt: skip
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "bursts": 1 if quick else 3,
        "burst_requests": 16 if quick else 120,
        "keepalive": 0.5 if quick else 2.0,
        "gap": 1.0 if quick else 4.0,
        "overhead_rounds": 1 if quick else 3,
        "overhead_requests": 300 if quick else 2000,
        "throughput_s": 2.0 if quick else 6.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.overhead_warmup = min(args.overhead_warmup, 50)
        args.throughput_warmup = min(args.throughput_warmup, 0.5)
    args.windows = [int(w) for w in str(args.window).split(",") if w]
    if args.quick:
        args.windows = args.windows[-1:]
    if args.gap <= args.keepalive:
        p.error("--gap must be longer than --keepalive (every burst must meet a cold cloud)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def run_rounds(
    args: argparse.Namespace,
    policies: list[str],
    trace: list[Any],
    assets: Any,
    opts: PolicyOptions,
    work: Path,
    console: Any,
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Part A's runs: every policy, then the what-if, round after round (rounds.py)."""
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
    what_ifs: list[dict[str, Any]] = []
    compared = "cooperative" in policies and "edge-only" in policies
    for r in range(args.rounds):
        tag = "" if args.rounds == 1 else f" (round {r + 1} of {args.rounds})"
        for policy in policies:
            console.print(f"[bold]A[/] {policy}{tag} …")
            quiet = wait_quiet(args.wait_quiet, console)
            folder = work / (policy if args.rounds == 1 else f"{policy}-{r + 1}")
            summary = asyncio.run(run_policy(policy, trace, assets, opts, folder))
            summary["quiet_wait"] = quiet
            runs[policy].append(summary)
            console.print(
                f"  p50 {fmt_s(summary['latency_ok']['p50_s'])}, "
                f"p99 {fmt_s(summary['latency_ok']['p99_s'])}, "
                f"large model {fmt_pct(summary['large_share'])}, "
                f"statuses {summary['statuses']}"
            )
        if compared and not args.no_what_if:
            console.print(f"[bold]A[/] WHAT-IF: cooperative, stand-in GPU cloud{tag} …")
            wait_quiet(args.wait_quiet, console)
            folder = work / ("what-if" if args.rounds == 1 else f"what-if-{r + 1}")
            this_round = {policy: runs[policy][-1] for policy in policies}
            what_ifs.append(asyncio.run(run_what_if(
                this_round, trace, assets, opts, folder, args.gpu_profile,
                args.what_if_cold_start,
            )))  # fmt: skip
    return runs, what_ifs


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=max(120, shutil.get_terminal_size((160, 40)).columns))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {POLICIES}")
    if args.cache is None:
        from cicada.demos.cold_start import default_cache

        args.cache = default_cache()
    results: dict[str, Any] = {"machine": machine_info(), "loadavg_start": loadavg()}
    notes = [
        "Scale-to-zero is emulated by the benchmark: a fresh `cicada cloud` process per burst, "
        "started at the burst's first request and SIGTERMed after the burst is answered and an "
        "idle keep-alive; the coordinator-driven lifecycle is a later issue.",
        "cloud-only sends every request as priority 2 with a long deadline (so it waits for "
        "the cold start); attainment judges every policy on the class deadlines.",
        "Cloud 'ready' = the worker's '<model> resident' log line (every stage resident; the "
        "worker reports READY with its next heartbeat once the model is built, so the line can "
        "lead the coordinator's view by up to one heartbeat interval: the coordinator-metrics "
        "time, which lags by up to one, is reported beside it); page cache warm.",
        f"Memory primed ({args.prime_gib:g} GiB touched and freed) before each burst"
        if args.prime_gib > 0
        else "Memory not primed before bursts (--prime-gib): the cloud's cold start touches "
        "memory the VM may have handed back to its host.",
        "Everything shares this machine's "
        f"{os.cpu_count()} cores: coordinator, edge agent (1 ORT thread per request), cloud "
        "worker (torch threads), load generator.",
    ]
    with tempfile.TemporaryDirectory(prefix="cicada-handoff-") as tmp:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_policies:
            console.print("[bold]assets[/] …")
            assets = gpt2_assets(args.quick, args.cache, work, args.seq_len)
            trace = make_trace(args.bursts, args.burst_requests, args.rate, args.seed)
            results["config"] = {
                "quick": args.quick,
                "model": assets.description,
                "inputs": list(assets.inputs.shape),
                "bursts": args.bursts,
                "burst_requests": args.burst_requests,
                "rate": args.rate,
                "mix": dict(MIX),
                "classes": {k: {"priority": p, "deadline_s": d} for k, (p, d) in CLASSES.items()},
                "keepalive_s": args.keepalive,
                "gap_s": args.gap,
                "prime_gib": args.prime_gib,
                "edge_capacity": args.edge_capacity,
                "cloud_threads": args.cloud_threads,
                "cloud_only_deadline_s": CLOUD_ONLY_DEADLINE_S,
                "trace_description": f"{args.bursts} burst(s) x {args.burst_requests} requests, "
                f"Poisson {args.rate:g} req/s, {assets.description}",
            }
            cores = sorted(os.sched_getaffinity(0))
            pin = None
            if not args.no_pin and len(cores) >= 2:
                pin = (set(cores[:-1]), {cores[-1]})
            opts = PolicyOptions(
                bursts=args.bursts, keepalive_s=args.keepalive, gap_s=args.gap,
                heartbeat_s=0.5, edge_capacity=args.edge_capacity, prime_gib=args.prime_gib,
                cloud_threads=args.cloud_threads, pin=pin,
            )  # fmt: skip
            results["config"]["pinning"] = (
                None if pin is None
                else {"everything_else": sorted(pin[0]), "cloud_worker": sorted(pin[1])}
            )  # fmt: skip
            if pin is not None:
                notes.append(
                    f"Part A pins the cloud worker to core(s) {sorted(pin[1])} (torch threads = "
                    f"{args.cloud_threads or len(pin[1])}) and the coordinator, edge agent and "
                    f"load generator to {sorted(pin[0])}, so the emulated cloud does not take the "
                    "edge's CPU (on a real deployment it runs on another machine). Other "
                    "tenants of this shared machine are not pinned."
                )
            with burner(args.burner, pin) as burning:
                results["config"]["burner"] = burning
                if burning is not None:
                    notes.append(
                        f"Another process (a busy loop) used one core all through part A: "
                        f"{args.burner} ({burning['cores'] or 'unpinned'})."
                    )
                runs, what_ifs = run_rounds(args, policies, trace, assets, opts, work, console)
            compared = "cooperative" in policies and "edge-only" in policies
            results["policies"] = {}
            for policy in policies:
                summary = pool_summaries(policy, runs[policy])
                if summary["cloud_compute_median_s"]:
                    summary["cloud_capacity_share"] = min(
                        1.0, 1.0 / (summary["cloud_compute_median_s"] * args.rate)
                    )
                    summary["large_share_bound"] = large_share_bound(summary)
                results["policies"][policy] = summary
                if policy == "cooperative":
                    summary["capacity_bound"] = run_capacity_bound(
                        summary, summary["cloud_compute_median_s"],
                        summary["edge_compute_median_s"],
                    )  # fmt: skip
            plot_policies(
                results["policies"], out / "handoff.png",
                f"Handoff on a bursty trace: {results['config']['trace_description']}",
            )  # fmt: skip
            pol = results["policies"]
            if compared:
                results["comparison"] = compare_modes(pol["cooperative"], pol["edge-only"])
                if args.rounds > 1:
                    results["rounds"] = compare_rounds(runs, what_ifs)
                if what_ifs:
                    results["what_if"] = judge_what_if(
                        pool_summaries("cooperative", [w["summary"] for w in what_ifs]),
                        pol["edge-only"], what_ifs[0]["profile"],
                        [w["cold_start_s"] for w in what_ifs],
                    )  # fmt: skip
                    plot_policies(
                        {WHAT_IF_LABEL: results["what_if"]["summary"]}, out / "what_if.png",
                        f"{WHAT_IF_LABEL}: {results['what_if']['profile']['source']}",
                    )  # fmt: skip
        if args.skip_coordinator:
            results["coordinator"] = None
        else:
            results["quiet_wait_part_b"] = wait_quiet(args.wait_quiet, console)
            results["coordinator"] = measure_coordinator(
                work / "coordinator", args.quick, args, console
            )
        for t in (results["coordinator"] or {}).get("throughput", []):
            profile_file = t.get("profile_file")
            if profile_file and (work / "coordinator" / profile_file).exists():
                shutil.copy(work / "coordinator" / profile_file, out / profile_file)
    if results["coordinator"] is not None:
        plot_overhead(results["coordinator"]["overhead"], out / "overhead.png")
    results["loadavg_end"] = loadavg()
    results["notes"] = notes
    if (
        "policies" in results
        and results["coordinator"] is not None
        and all(p in results["policies"] for p in POLICIES)
    ):
        results["targets"] = evaluate_targets(results)
    else:
        results["targets"] = []
    results["bound_targets"] = bound_targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_report(results, console)
    console.print(f"wrote {out / 'results.json'}, {out / 'handoff.png'}, {out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
