"""Arrivals (Poisson, MMPP, diurnal) and multi-tenant mixes of agent fleets.

A mix is data (it comes from a scenario file): tenants, each with an arrival
process, a rate, a size scale and a distribution over agent types. ``build``
draws every session of a run from one seed, tenant by tenant, so adding a
tenant never changes another tenant's sessions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.workloads.fleets import (
    AgentSession,
    BrowsingParams,
    CodingParams,
    MultiAgentParams,
    RagParams,
    browsing_session,
    coding_session,
    multi_agent_sessions,
    rag_session,
    single_shot_session,
)

AGENT_TYPES = ("coding", "browsing", "rag", "multi_agent", "single_shot")
#: Arrival time of a closed-loop session (the simulator decides when it starts).
CLOSED_LOOP = -2.0


@dataclass(frozen=True, slots=True)
class Arrivals:
    """An arrival process; ``rate_per_s`` is the long-run mean rate.

    ``poisson``: exponential gaps. ``mmpp``: a two-state Markov-modulated
    Poisson process, ``burst_factor`` times the base rate in the high state,
    mean sojourns ``high_s``/``low_s``, normalised so the mean rate holds.
    ``diurnal``: the rate follows 1 + ``amplitude`` × sin over ``period_s``
    (a compressed day), drawn by thinning. ``closed``: a closed loop of
    ``concurrency`` tasks in flight (a new task starts when one finishes, as
    agent benchmarks run); its sessions carry ``CLOSED_LOOP`` as arrival time
    and the simulator starts them.
    """

    kind: str = "poisson"
    rate_per_s: float = 1.0
    burst_factor: float = 4.0
    high_s: float = 30.0
    low_s: float = 90.0
    amplitude: float = 0.6
    period_s: float = 600.0
    concurrency: int = 0

    @property
    def closed(self) -> bool:
        """True for a closed loop (tasks start when others finish)."""
        return self.kind == "closed"

    def times(self, rng: np.random.Generator, duration_s: float) -> list[float]:
        """Arrival instants in [0, duration_s)."""
        if self.kind == "closed":
            # a backlog long enough that no slot runs dry: tasks last tens of seconds at least
            n = self.concurrency * max(4, int(duration_s / 20.0))
            return [CLOSED_LOOP] * n
        if self.rate_per_s <= 0:
            return []
        if self.kind == "poisson":
            return _poisson(rng, self.rate_per_s, 0.0, duration_s)
        if self.kind == "mmpp":
            share_high = self.high_s / (self.high_s + self.low_s)
            low = self.rate_per_s / (share_high * self.burst_factor + (1 - share_high))
            out: list[float] = []
            t, high = 0.0, bool(rng.random() < share_high)
            while t < duration_s:
                stay = float(rng.exponential(self.high_s if high else self.low_s))
                end = min(duration_s, t + stay)
                out += _poisson(rng, low * (self.burst_factor if high else 1.0), t, end)
                t, high = end, not high
            return out
        if self.kind == "diurnal":
            peak = self.rate_per_s * (1 + self.amplitude)
            cand = _poisson(rng, peak, 0.0, duration_s)
            keep = rng.random(len(cand))
            return [
                t
                for t, u in zip(cand, keep, strict=True)
                if u * peak
                < self.rate_per_s * (1 + self.amplitude * math.sin(2 * math.pi * t / self.period_s))
            ]
        raise ValueError(f"unknown arrival process {self.kind!r}")


def _poisson(rng: np.random.Generator, rate: float, start: float, end: float) -> list[float]:
    n = int(rng.poisson(rate * (end - start)))
    return sorted(float(x) for x in rng.uniform(start, end, n))


@dataclass(frozen=True, slots=True)
class TenantMix:
    """One tenant's traffic."""

    tenant_id: str
    arrivals: Arrivals
    agents: dict[str, float] = field(default_factory=lambda: {"coding": 1.0})
    scale: float = 1.0  # stretches task sizes (steps, context)
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class FleetParams:
    """Per-agent-type parameters (defaults cite their sources)."""

    coding: CodingParams = field(default_factory=CodingParams)
    browsing: BrowsingParams = field(default_factory=BrowsingParams)
    rag: RagParams = field(default_factory=RagParams)
    multi_agent: MultiAgentParams = field(default_factory=MultiAgentParams)


def build(
    tenants: list[TenantMix], duration_s: float, seed: int, params: FleetParams | None = None
) -> list[AgentSession]:
    """Every session of a run, sorted by arrival (spawned workers last, arrival -1)."""
    p = params or FleetParams()
    roots: list[tuple[float, str, str, dict[str, Any], list[dict[str, Any]]]] = []
    for k, ten in enumerate(tenants):
        rng = np.random.default_rng([seed, k])
        names = list(ten.agents)
        probs = np.array([ten.agents[n] for n in names], dtype=np.float64)
        probs /= probs.sum()
        for t in ten.arrivals.times(rng, duration_s):
            kind = names[int(rng.choice(len(names), p=probs))]
            kids: list[dict[str, Any]] = []
            if kind == "coding":
                f = coding_session(rng, p.coding, ten.scale)
            elif kind == "browsing":
                f = browsing_session(rng, p.browsing, ten.scale)
            elif kind == "rag":
                f = rag_session(rng, p.rag, ten.scale)
            elif kind == "multi_agent":
                f, kids = multi_agent_sessions(rng, p.multi_agent, ten.scale)
            elif kind == "single_shot":
                f = single_shot_session(rng, ten.scale)
            else:
                raise ValueError(f"unknown agent type {kind!r} (known: {AGENT_TYPES})")
            roots.append((t, ten.tenant_id, kind, f, kids))
    roots.sort(key=lambda r: r[0])  # stable: closed-loop backlogs keep their draw order
    out: list[AgentSession] = []
    spawned: list[AgentSession] = []
    for t, tenant, kind, f, kids in roots:
        idx = len(out)
        s = AgentSession(
            f"s{idx}",
            tenant,
            kind,
            t,
            f["prompt_tokens"],
            f["output_tokens"],
            f["tool_names"],
            f["tool_latency_s"],
            join_after_step=f.get("join_after_step", -1),
        )
        out.append(s)
        for j, kf in enumerate(kids):
            spawned.append(
                AgentSession(
                    f"s{idx}w{j}",
                    tenant,
                    "multi_agent_worker",
                    -1.0,
                    kf["prompt_tokens"],
                    kf["output_tokens"],
                    kf["tool_names"],
                    kf["tool_latency_s"],
                    parent=idx,
                    spawn_after_step=kf["spawn_after_step"],
                    shared_prefix_tokens=kf["shared_prefix_tokens"],
                )
            )
    for w in spawned:
        out[w.parent].children.append(len(out))
        out.append(w)
    return out
