"""``kvsched top``: a live terminal view of a running scheduler (AdminService stats)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import grpc
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _bar(used: int, cap: int, width: int = 20) -> str:
    frac = used / cap if cap else 0.0
    n = round(frac * width)
    return f"[{'#' * n}{'.' * (width - n)}] {frac:5.1%}"


def render(
    stats: admin_pb2.ClusterStats,
    workers: Sequence[admin_pb2.WorkerInfo],
    rates: dict[str, float],
    target: str,
) -> Group:
    """The screen for one poll: cluster summary, tenants, workers."""
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[b]kvsched[/b] {target}",
        f"leader epoch {stats.leader_epoch}",
        f"up {stats.uptime_s:,.0f}s",
        f"workers {stats.workers_connected}/{stats.workers}",
    )
    head.add_row(
        f"sessions: running {stats.sessions_running:,}",
        f"tool-wait {stats.sessions_tool_wait:,}",
        f"idle {stats.sessions_idle:,}",
        f"GPU KV {_bar(stats.gpu_used_blocks, stats.gpu_capacity_blocks)}",
    )
    head.add_row(
        f"events/s {rates.get('events', 0.0):,.0f}",
        f"Place/s {rates.get('placements', 0.0):,.0f}",
        f"directives/s {rates.get('directives', 0.0):,.0f}",
        "",
    )
    tenants = Table(title="tenants", expand=True)
    for col in (
        "tenant",
        "live sessions",
        "completed",
        "events",
        "KV on GPU",
        "KV on host",
        "mean slowdown",
    ):
        tenants.add_column(col, justify="right" if col != "tenant" else "left")
    slowdowns = [t.mean_slowdown for t in stats.tenants if t.mean_slowdown > 0]
    for t in stats.tenants:
        tenants.add_row(
            t.tenant_id,
            f"{t.sessions:,}",
            f"{t.completed_sessions:,}",
            f"{t.events:,}",
            _gib(t.kv_gpu_bytes),
            _gib(t.kv_host_bytes),
            f"{t.mean_slowdown:.2f}" if t.mean_slowdown else "-",
        )
    if len(slowdowns) > 1:
        tenants.caption = f"fairness: max/min slowdown {max(slowdowns) / min(slowdowns):.2f}"
    wt = Table(title="workers", expand=True)
    for col in ("worker", "state", "GPU KV", "sessions", "running", "queued prefill"):
        wt.add_column(col, justify="left" if col in ("worker", "state", "GPU KV") else "right")
    for w in workers:
        state = "draining" if w.draining else ("up" if w.connected else "[red]down[/red]")
        wt.add_row(
            w.worker_id,
            state,
            _bar(w.gpu_used_blocks, w.cache_spec.gpu_capacity_blocks),
            f"{w.sessions:,}",
            f"{w.running_steps:,}",
            f"{w.queued_prefill_tokens:,}",
        )
    return Group(Panel(head), tenants, wt)


def top_main(argv: Sequence[str]) -> int:
    """Poll GetClusterStats + ListWorkers and redraw; returns the exit code."""
    p = argparse.ArgumentParser(prog="kvsched top", description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--interval-s", type=float, default=1.0)
    p.add_argument(
        "--token",
        default=os.environ.get("KVSCHED_TOKEN", ""),
        help="bearer token (default: $KVSCHED_TOKEN)",
    )
    p.add_argument("--once", action="store_true", help="print one screen and exit")
    ns = p.parse_args(list(argv))
    md = (("authorization", f"Bearer {ns.token}"),) if ns.token else ()
    with grpc.insecure_channel(ns.target) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)

        def poll() -> tuple[admin_pb2.ClusterStats, Sequence[admin_pb2.WorkerInfo]]:
            stats = admin.GetClusterStats(
                admin_pb2.GetClusterStatsRequest(), metadata=md, timeout=5
            )
            try:
                workers = admin.ListWorkers(
                    admin_pb2.ListWorkersRequest(), metadata=md, timeout=5
                ).workers
            except grpc.RpcError:
                workers = []  # a tenant-admin token sees no fleet
            return stats, workers

        try:
            prev, _ = poll()
        except grpc.RpcError as e:
            print(f"kvsched top: {ns.target}: {e.code().name}: {e.details()}")
            return 1
        prev_t = time.monotonic()
        if ns.once:
            from rich.console import Console

            Console().print(render(prev, poll()[1], {}, ns.target))
            return 0
        with Live(render(prev, [], {}, ns.target), refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(ns.interval_s)
                    try:
                        stats, workers = poll()
                    except grpc.RpcError as e:
                        live.update(Panel(f"[red]{ns.target}: {e.code().name}: {e.details()}"))
                        continue
                    now = time.monotonic()
                    dt = max(1e-6, now - prev_t)
                    rates = {
                        "events": (stats.events_total - prev.events_total) / dt,
                        "placements": (stats.placements_total - prev.placements_total) / dt,
                        "directives": (stats.directives_total - prev.directives_total) / dt,
                    }
                    live.update(render(stats, workers, rates, ns.target))
                    prev, prev_t = stats, now
            except KeyboardInterrupt:
                return 0
