"""Simulator speed: agent steps simulated per minute of wall time, per policy.

Run: python bench/sim_bench.py [--scenario standard] [--gpus 64] [--duration 900]
Workload generation is timed separately from the simulation. Results go in
bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import platform
import time

from loadtest.sim.run import closed_loop, load_scenario, make_policy
from loadtest.sim.simulator import Simulator
from loadtest.workloads import build


def main() -> None:
    """Print steps/min for each policy on one scenario."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scenario", default="standard")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--duration", type=float, default=900.0)
    p.add_argument("--policies", default="rr-lru,vllm-apc,llmd-prefix,ttl-pin,oracle,kvsched")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    sc = load_scenario(a.scenario, gpus=a.gpus, duration_s=a.duration)
    t0 = time.perf_counter()
    sessions = build(sc.mixes(), sc.duration_s, a.seed)
    gen_s = time.perf_counter() - t0
    print(f"{platform.processor() or platform.machine()} python {platform.python_version()}")
    print(
        f"scenario {sc.name}: {a.gpus} GPUs, {sc.duration_s:.0f} s virtual, "
        f"{len(sessions)} sessions generated in {gen_s:.2f} s"
    )
    print(f"{'policy':<12} {'steps':>8} {'wall s':>7} {'steps/min':>12} {'virtual s/wall s':>17}")
    for name in a.policies.split(","):
        sim = Simulator(
            sessions,
            sc.cluster,
            make_policy(name),
            sc.duration_s,
            sc.slo_ttft_s,
            record_trace=False,
            closed_loop=closed_loop(sc),
        )
        t0 = time.perf_counter()
        sim.run()
        wall = time.perf_counter() - t0
        print(
            f"{name:<12} {sim.steps_done:>8} {wall:>7.2f} {sim.steps_done / wall * 60:>12,.0f} "
            f"{sc.duration_s / wall:>17.0f}"
        )


if __name__ == "__main__":
    main()
