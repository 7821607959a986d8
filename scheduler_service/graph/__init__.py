"""Agent execution graphs: one per agent type, learned online from events."""

from __future__ import annotations

import math

from scheduler_service.graph.agent_graph import (
    FINISH_KEY,
    FINISH_NODE,
    AgentGraph,
    GraphPrior,
    NodeKey,
    WaitPrediction,
)
from scheduler_service.graph.sketch import DURATION_BUCKETS, TOKEN_BUCKETS, LogBuckets


class GraphStore:
    """The graphs of every agent type, indexed by a dense agent slot."""

    def __init__(self, prior: GraphPrior | None = None) -> None:
        self.prior = prior or GraphPrior()
        self.graphs: dict[int, AgentGraph] = {}
        # no graph can be due to rescale before this time (a lower bound: a
        # rescale only moves a graph's reference time forward)
        self._none_due_until = -math.inf

    def for_agent(self, agent_slot: int, agent_type: str, now: float = 0.0) -> AgentGraph:
        """The graph of an interned agent type (created on first use, at ``now``)."""
        g = self.graphs.get(agent_slot)
        if g is None:
            g = self.graphs[agent_slot] = AgentGraph(agent_type, self.prior, now)
            self._none_due_until = min(self._none_due_until, g.not_due_until())
        return g

    def rescale_due(self, now: float) -> None:
        """Rescale every graph whose weights would rescale at ``now``.

        # NOTE: the engine calls this at the start of each batch and tick, on
        # either path, so within one call no graph rescales: the compiled
        # batch path relies on it. A rescale changes no ratio, only the scale.
        """
        if now <= self._none_due_until:
            return
        for g in self.graphs.values():
            g.rescale_if_due(now)
        self._none_due_until = min(
            (g.not_due_until() for g in self.graphs.values()), default=math.inf
        )


__all__ = [
    "DURATION_BUCKETS",
    "FINISH_KEY",
    "FINISH_NODE",
    "TOKEN_BUCKETS",
    "AgentGraph",
    "GraphPrior",
    "GraphStore",
    "LogBuckets",
    "NodeKey",
    "WaitPrediction",
]
