"""``kvsched simulate``: compare policies on one scenario, one seed, in one run."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.sim.run import (
    POLICIES,
    load_scenario,
    peak_throughput,
    run_policy,
    scenario_names,
)
from loadtest.workloads import build

#: The keys every policy carries in ``--json`` output.
JSON_KEYS = (
    "task_completions_per_hour",
    "jct_p50_s",
    "jct_p99_s",
    "slo_attainment",
    "recompute_share",
    "kv_util",
    "token_hit_ratio",
    "misses_vs_oracle",
    "peak_throughput_tokens_per_s",
    "tenant_slowdown_ratio",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvsched simulate", description="Compare scheduling policies in the simulator."
    )
    p.add_argument(
        "--scenario",
        default="standard",
        help=f"shipped name ({', '.join(scenario_names())}) or a .toml path",
    )
    p.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated policies (default: all)"
    )
    p.add_argument("--gpus", type=int, default=None, help="GPUs in the fleet (default: scenario)")
    p.add_argument(
        "--duration", type=float, default=None, help="virtual seconds (default: the scenario's)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--kv-transfer-gpus",
        type=int,
        default=None,
        help="GPUs per KV-transfer domain (8: a node's replicas load each other's KV"
        " through its host memory; 0: none; default: the scenario's)",
    )
    p.add_argument(
        "--no-peak", action="store_true", help="skip the single-shot peak-throughput probe"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument("--report", metavar="DIR", help="write an HTML report with plots here")
    p.add_argument(
        "--trace-out",
        metavar="DIR",
        help="write each policy's agent trace as DIR/<policy>.jsonl (kvsched replay reads it)",
    )
    return p


def _clean(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def simulate_main(argv: Sequence[str]) -> int:
    """Run the comparison; prints a table (or JSON) and returns the exit code."""
    args = _parser().parse_args(list(argv))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(
            f"kvsched simulate: unknown policies {unknown} (known: {', '.join(POLICIES)})",
            file=sys.stderr,
        )
        return 2
    try:
        sc = load_scenario(args.scenario, gpus=args.gpus, duration_s=args.duration)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        print(f"kvsched simulate: {exc}", file=sys.stderr)
        return 2
    if args.kv_transfer_gpus is not None:
        try:
            cluster = replace(sc.cluster, kv_transfer_gpus=args.kv_transfer_gpus)
        except ValueError as exc:
            print(f"kvsched simulate: --kv-transfer-gpus: {exc}", file=sys.stderr)
            return 2
        sc = replace(sc, cluster=cluster)
    started = time.perf_counter()
    sessions = build(sc.mixes(), sc.duration_s, args.seed)
    results: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.completed:>6.0f}/{task.total:.0f} s virtual"),
        TimeElapsedColumn(),
        console=console,
        transient=args.json,
        disable=not console.is_terminal and args.json,
    ) as bar:
        for name in policies:
            task = bar.add_task(name, total=sc.duration_s)

            def tick(t: float, task: int = task) -> None:
                bar.update(task, completed=t)  # type: ignore[arg-type]

            summary, ser, sim = run_policy(
                sc, name, args.seed, tick, sessions, trace_events=bool(args.trace_out)
            )
            if args.trace_out:
                d = Path(args.trace_out)
                d.mkdir(parents=True, exist_ok=True)
                with (d / f"{name}.jsonl").open("w") as f:
                    for ev in sim.events or ():
                        f.write(json.dumps(ev) + "\n")
            summary["peak_throughput_tokens_per_s"] = (
                float("nan") if args.no_peak else peak_throughput(sc, name, args.seed)
            )
            bar.update(task, completed=sc.duration_s)
            results[name] = summary
            series[name] = ser
    wall_s = time.perf_counter() - started
    out = {
        "scenario": sc.name,
        "seed": args.seed,
        "gpus": sc.cluster.gpus,
        "duration_s": sc.duration_s,
        "sessions": len(sessions),
        "wall_s": wall_s,
        "policies": _clean(results),
    }
    if args.report:
        from loadtest.report import write_html

        path = write_html(args.report, out, series)
        if not args.json:
            console.print(f"report: {path}")
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=False))
    else:
        from loadtest.report import print_table

        print_table(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(simulate_main(sys.argv[1:]))
