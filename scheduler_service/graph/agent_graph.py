"""The agent execution graph of one agent type: learn online, predict waits.

Nodes are (event kind, tool name) pairs a session waits in: a tool call
(TOOL_CALL_WAIT, tool) or the gap after a step (STEP_END, ""). Node 0 is the
terminal FINISH. Per node the graph keeps transition counts to the next node,
a log-bucket sketch of how long the wait lasted and of how many tokens the
context grew by before the next step, and whether the session continued or
finished. Everything ages exponentially with ``now`` (a half-life), so the
graph follows a workload that drifts; a new node starts from a prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import EventKind
from scheduler_service.graph.sketch import DURATION_BUCKETS, TOKEN_BUCKETS

NodeKey = tuple[int, str]
#: Nodes per graph (the transition matrix is MAX_NODES² floats: 128 KiB).
MAX_NODES = 128
OTHER_TOOL = "*other*"
FINISH_NODE = 0
FINISH_KEY: NodeKey = (0, "finish")

# NOTE: observation weights grow as exp(age / tau) instead of decaying every
# count on every event; once they get large everything is rescaled at once.
# Same result, O(1) per observation, and still a pure function of ``now``.
_RESCALE_AT_EXPONENT = 30.0


@dataclass(frozen=True, slots=True)
class GraphPrior:
    """What the graph believes before it has seen a node."""

    tool_s: float = 2.0
    idle_s: float = 1.0
    tokens: float = 1500.0
    p_finish: float = 0.05
    weight: float = 2.0  # in observations: the first few real ones outvote it
    hint_weight: float = 4.0  # a declared latency counts as this many observations
    half_life_s: float = 3600.0
    early_quantile: float = 0.2  # prefetch aims to finish before this quantile


class WaitPrediction(NamedTuple):
    """What the graph expects of a session waiting in a node.

    # NOTE: a NamedTuple, not a frozen dataclass: one is built per tool wait on
    # the event path, and a tuple is several times cheaper to construct.
    """

    expected_remaining_s: float
    early_remaining_s: float
    p_continue: float
    expected_next_tokens: float


class AgentGraph:
    """Markov graph with per-node sketches for one agent type."""

    #: Bumped whenever the arrays are replaced (growth) or rescaled, so a
    #: holder of references to them (the engine's batch path) knows to refresh.
    version = 0

    def __init__(self, agent_type: str, prior: GraphPrior | None = None, now: float = 0.0) -> None:
        self.agent_type = agent_type
        self.prior = prior or GraphPrior()
        self._tau_s = self.prior.half_life_s / math.log(2.0)
        # weights are exp((now - _t_ref) / tau); they start at the creation time
        self._t_ref = now
        self._w_at: tuple[float, float] = (math.nan, 1.0)  # (now, weight) of the last call
        self.index: dict[NodeKey, int] = {}
        self.keys: list[NodeKey] = []
        cap = 8
        nb, nt = DURATION_BUCKETS.n, TOKEN_BUCKETS.n
        self.trans = np.zeros((cap, cap), dtype=np.float64)
        self.duration = np.zeros((cap, nb), dtype=np.float64)
        self.tokens = np.zeros((cap, nt), dtype=np.float64)
        self.continued = np.zeros(cap, dtype=np.float64)
        self.finished = np.zeros(cap, dtype=np.float64)
        # NOTE: exact aged sums beside the token sketch: the mean the engine asks
        # for on every wait is then O(1), and free of bucket rounding.
        self.tokens_sum = np.zeros(cap, dtype=np.float64)
        self.tokens_weight = np.zeros(cap, dtype=np.float64)
        # NOTE: created at ``now``, so its weights start there (a graph made at
        # time 0 in a server whose clock reads 1.7e9 would rescale on first use)
        self.node(FINISH_KEY, now)

    # -- learning ----------------------------------------------------------------

    def lookup(self, key: NodeKey) -> int | None:
        """The node ``node(key)`` would return, or None while it does not exist."""
        i = self.index.get(key)
        if i is None and self._full(key):
            return self.index.get((key[0], OTHER_TOOL))
        return i

    def node(self, key: NodeKey, now: float, hint_s: float = 0.0) -> int:
        """The node for ``key``, created from the prior on first sight."""
        i = self.index.get(key)
        if i is not None:
            return i
        if self._full(key):
            return self.node((key[0], OTHER_TOOL), now, hint_s)
        i = len(self.keys)
        if i >= self.trans.shape[0]:
            self._grow()
        self.index[key] = i
        self.keys.append(key)
        w = self._weight(now) * self.prior.weight
        p = self.prior
        typical_s = hint_s or (p.idle_s if key[0] == EventKind.STEP_END else p.tool_s)
        self.duration[i] += DURATION_BUCKETS.spread(typical_s, w)
        self.tokens[i] += TOKEN_BUCKETS.spread(p.tokens, w)
        self.tokens_sum[i] += p.tokens * w
        self.tokens_weight[i] += w
        self.continued[i] += (1.0 - p.p_finish) * w
        self.finished[i] += p.p_finish * w
        return i

    def observe_transition(self, src: int, dst: int, now: float) -> None:
        """A session went from node ``src`` to node ``dst``."""
        self.trans[src, dst] += self._weight(now)

    def observe_duration(self, node: int, seconds: float, now: float) -> None:
        """A wait in ``node`` lasted ``seconds``."""
        self.duration[node, DURATION_BUCKETS.index(seconds)] += self._weight(now)

    def observe_tokens(self, node: int, tokens: int, now: float) -> None:
        """The context grew by ``tokens`` between entering ``node`` and the next step."""
        w = self._weight(now)
        self.tokens[node, TOKEN_BUCKETS.index(float(tokens))] += w
        self.tokens_sum[node] += tokens * w
        self.tokens_weight[node] += w

    def observe_outcome(self, node: int, continued: bool, now: float) -> None:
        """After waiting in ``node`` the session ran another step (or finished)."""
        if continued:
            self.continued[node] += self._weight(now)
        else:
            self.finished[node] += self._weight(now)

    # -- prediction ----------------------------------------------------------------

    def predict(
        self,
        node: int,
        waited_s: float,
        now: float,
        remaining_time: object,
        hint_s: float = 0.0,
    ) -> WaitPrediction:
        """Remaining wait (mean, early quantile), P(continue), next-step tokens."""
        hist = self.duration[node]
        if hint_s > 0.0:
            hist = hist + DURATION_BUCKETS.spread(
                hint_s, self.prior.hint_weight * self._weight(now)
            )
        mean_s, early_s, _mass = remaining_time(  # type: ignore[operator]
            hist,
            DURATION_BUCKETS.upper_edges,
            DURATION_BUCKETS.mids,
            float(waited_s),
            self.prior.early_quantile,
        )
        c, f = float(self.continued[node]), float(self.finished[node])
        p_continue = c / (c + f) if c + f > 0 else 1.0 - self.prior.p_finish
        return WaitPrediction(
            expected_remaining_s=float(mean_s),
            early_remaining_s=float(early_s),
            p_continue=p_continue,
            expected_next_tokens=float(self.tokens_sum[node] / self.tokens_weight[node]),
        )

    def mean_duration_s(self, node: int) -> float:
        """Mean of a node's duration sketch (prior included)."""
        return DURATION_BUCKETS.mean(self.duration[node])

    def transition_probs(self, node: int) -> dict[NodeKey, float]:
        """P(next node | node) over the nodes seen after it."""
        row = self.trans[node, : len(self.keys)]
        total = float(row.sum())
        if total <= 0:
            return {}
        return {self.keys[j]: float(row[j]) / total for j in np.flatnonzero(row)}

    def not_due_until(self) -> float:
        """A time up to which ``rescale_if_due`` surely does nothing (one exponent
        short of the rescale, so rounding cannot matter)."""
        return self._t_ref + (_RESCALE_AT_EXPONENT - 1.0) * self._tau_s

    def rescale_if_due(self, now: float) -> None:
        """Rescale the weights now if the next observation would (see ``_weight``)."""
        if (now - self._t_ref) / self._tau_s > _RESCALE_AT_EXPONENT:
            self._weight(now)

    # -- internals -----------------------------------------------------------------

    def _full(self, key: NodeKey) -> bool:
        # NOTE: tool names come from clients (some put arguments in them); past
        # the cap new ones share one node per kind, so a graph's transition
        # matrix stays within MAX_NODES² floats.
        return len(self.keys) >= MAX_NODES - 1 and key[1] != OTHER_TOOL

    def _weight(self, now: float) -> float:
        if now == self._w_at[0]:
            return self._w_at[1]
        x = (now - self._t_ref) / self._tau_s
        if x > _RESCALE_AT_EXPONENT:
            scale = math.exp(-x)
            for arr in (
                self.trans,
                self.duration,
                self.tokens,
                self.continued,
                self.finished,
                self.tokens_sum,
                self.tokens_weight,
            ):
                arr *= scale
            self._t_ref = now
            self.version += 1
            x = 0.0
        w = math.exp(x)
        self._w_at = (now, w)
        return w

    def _grow(self) -> None:
        self.version += 1
        cap = self.trans.shape[0] * 2
        trans = np.zeros((cap, cap), dtype=np.float64)
        n = self.trans.shape[0]
        trans[:n, :n] = self.trans
        self.trans = trans
        self.duration = _grow_rows(self.duration, cap)
        self.tokens = _grow_rows(self.tokens, cap)
        self.continued = _grow_rows(self.continued, cap)
        self.finished = _grow_rows(self.finished, cap)
        self.tokens_sum = _grow_rows(self.tokens_sum, cap)
        self.tokens_weight = _grow_rows(self.tokens_weight, cap)


def _grow_rows(a: npt.NDArray[np.float64], cap: int) -> npt.NDArray[np.float64]:
    out = np.zeros((cap, *a.shape[1:]), dtype=np.float64)
    out[: a.shape[0]] = a
    return out
