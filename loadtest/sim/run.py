"""Scenarios (TOML files) and runs: one workload, every policy, one seed.

A scenario file names the cluster (GPU, model, tensor parallel), the step SLO,
the default duration and the tenants; arrival rates are per GPU per minute so
``--gpus`` scales the load with the fleet.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.sim.cluster import ClusterConfig
from loadtest.sim.oracle import replay_sessions
from loadtest.sim.policies import BASELINES, Policy
from loadtest.sim.simulator import Simulator
from loadtest.workloads import Arrivals, TenantMix, build

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
POLICIES = ("rr-lru", "vllm-apc", "llmd-prefix", "ttl-pin", "kvsched", "oracle")
#: Replicas the single-shot peak-throughput probe runs on (scaled to the fleet).
PROBE_REPLICAS = 4
PROBE_DURATION_S = 30.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """A workload on a cluster, as read from a scenario file."""

    name: str
    description: str
    cluster: ClusterConfig
    tenants: tuple[dict[str, Any], ...]
    duration_s: float
    slo_ttft_s: float
    # agents declare each tool call's expected latency to the scheduler (a hint)
    tool_hints: bool = False

    def mixes(self) -> list[TenantMix]:
        """Tenant mixes with rates scaled to the cluster's GPUs."""
        out = []
        for t in self.tenants:
            a = dict(t["arrivals"])
            per_min = float(a.pop("rate_per_gpu_per_min", 0.0))
            per_gpu = float(a.pop("sessions_per_gpu", 0.0))
            arrivals = Arrivals(
                rate_per_s=per_min * self.cluster.gpus / 60.0,
                concurrency=max(1, round(per_gpu * self.cluster.gpus)) if per_gpu else 0,
                **a,
            )
            out.append(
                TenantMix(
                    str(t["id"]),
                    arrivals,
                    dict(t.get("agents", {"coding": 1.0})),
                    float(t.get("scale", 1.0)),
                    float(t.get("weight", 1.0)),
                )
            )
        return out


def scenario_names() -> list[str]:
    """Scenario files shipped with the simulator."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(
    name_or_path: str, gpus: int | None = None, duration_s: float | None = None
) -> Scenario:
    """Read a shipped scenario by name, or any scenario file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(f"no scenario {name_or_path!r} (shipped: {scenario_names()})")
    with path.open("rb") as f:
        d = tomllib.load(f)
    cluster = ClusterConfig(**d.get("cluster", {}))
    if gpus is not None:
        cluster = replace(cluster, gpus=gpus)
    return Scenario(
        str(d.get("name", path.stem)),
        str(d.get("description", "")),
        cluster,
        tuple(d["tenants"]),
        float(duration_s or d.get("duration_s", 300.0)),
        float(d.get("slo_ttft_s", 2.0)),
        bool(d.get("tool_hints", False)),
    )


def make_policy(
    name: str, tool_hints: bool = False, tenant_weights: dict[str, float] | None = None
) -> Policy:
    """A fresh policy by name; kvsched gets latency hints and tenant weights when given."""
    if name == "kvsched":
        from loadtest.sim.kvsched_policy import KvschedPolicy

        pol = KvschedPolicy()
        pol.send_hints = tool_hints
        pol.tenant_weights = dict(tenant_weights or {})
        return pol
    if name not in BASELINES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    policy: Policy = BASELINES[name]()
    return policy


def run_policy(
    sc: Scenario,
    policy: str,
    seed: int,
    progress: Callable[[float], None] | None = None,
    sessions: list[Any] | None = None,
    trace_events: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], Simulator]:
    """Simulate one policy; returns (summary, series, simulator)."""
    if sessions is None:
        sessions = build(sc.mixes(), sc.duration_s, seed)
    sim = Simulator(
        sessions,
        sc.cluster,
        make_policy(policy, sc.tool_hints, {m.tenant_id: m.weight for m in sc.mixes()}),
        sc.duration_s,
        sc.slo_ttft_s,
        closed_loop=closed_loop(sc),
        trace_events=trace_events,
    )
    rec = sim.run(progress)
    oracle = sum(replay_sessions(tr, sim.model.capacity_blocks, "belady") for tr in rec.trace)
    summary = rec.summary(sc.duration_s, oracle)
    summary["steps_completed"] = sim.steps_done
    return summary, rec.series(sc.duration_s), sim


def closed_loop(sc: Scenario) -> dict[str, int]:
    """Tasks in flight per closed-loop tenant."""
    return {m.tenant_id: m.arrivals.concurrency for m in sc.mixes() if m.arrivals.closed}


def peak_throughput(sc: Scenario, policy: str, seed: int) -> float:
    """Tokens/s (prompt + output) the fleet sustains on single-shot overload."""
    probe = load_scenario(
        "singleshot",
        gpus=min(PROBE_REPLICAS, sc.cluster.replicas) * sc.cluster.tensor_parallel,
        duration_s=PROBE_DURATION_S,
    )
    probe = replace(probe, cluster=replace(sc.cluster, gpus=probe.cluster.gpus))
    sessions = build(probe.mixes(), probe.duration_s, seed)
    sim = Simulator(
        sessions,
        probe.cluster,
        make_policy(policy),
        probe.duration_s,
        probe.slo_ttft_s,
        record_trace=False,
    )
    rec = sim.run()
    return rec.tokens_done / probe.duration_s * sc.cluster.replicas / probe.cluster.replicas
