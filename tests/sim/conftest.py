"""Helpers for simulator tests: scripted sessions on a tiny cluster."""

from __future__ import annotations

from loadtest.sim.cluster import ClusterConfig
from loadtest.sim.simulator import Simulator
from loadtest.workloads import AgentSession


def session(
    name: str,
    arrival_s: float,
    prompts: list[int],
    outs: list[int],
    tools_s: list[float],
    tenant: str = "t",
) -> AgentSession:
    """A scripted session: ``tools_s[i]`` is the tool wait after step ``i``."""
    names = ["test"] * (len(prompts) - 1) + [""]
    return AgentSession(name, tenant, "coding", arrival_s, prompts, outs, names, [*tools_s, 0.0])


def tiny_sim(
    sessions: list[AgentSession],
    policy: object,
    gpus: int = 1,
    capacity_blocks: int = 100,
    duration_s: float = 100.0,
) -> Simulator:
    """A simulator whose replicas hold ``capacity_blocks`` of 16 tokens each."""
    sim = Simulator(sessions, ClusterConfig(gpus=gpus), policy, duration_s)
    for r in sim.replicas:
        r.pool.cap = capacity_blocks
        r.pool.host_cap = capacity_blocks
    return sim


def first_tokens(sim: Simulator) -> list[int]:
    """The sessions in the order their steps' prefills finish, filled in as ``sim`` runs."""
    order: list[int] = []
    first_token = sim.rec.first_token

    def seen(sid: int, ttft_s: float, decode_gpu_s: float) -> None:
        order.append(sid)
        first_token(sid, ttft_s, decode_gpu_s)

    sim.rec.first_token = seen  # type: ignore[method-assign]
    return order
