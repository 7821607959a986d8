"""The agent execution graph learns the generating distribution and forgets old data."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_service import kernels
from scheduler_service.domain import EventKind
from scheduler_service.graph import (
    DURATION_BUCKETS,
    FINISH_KEY,
    FINISH_NODE,
    AgentGraph,
    GraphPrior,
)

RT = kernels.NUMBA.remaining_time
WAIT = int(EventKind.TOOL_CALL_WAIT)


def _train(g: AgentGraph, rng: np.random.Generator, n: int, t0: float = 0.0) -> np.ndarray:
    """Sessions call pytest (lognormal ~10 s), grow by ~2k tokens, continue 80% of the time."""
    node = g.node((WAIT, "pytest"), t0)
    durations = rng.lognormal(np.log(10.0), 0.5, n)
    for i, d in enumerate(durations):
        now = t0 + i * 0.01
        g.observe_duration(node, float(d), now)
        g.observe_tokens(node, int(rng.normal(2000, 200)), now)
        g.observe_outcome(node, bool(rng.random() < 0.8), now)
    return durations


def test_predictions_converge_to_the_generating_distribution() -> None:
    rng = np.random.default_rng(7)
    g = AgentGraph("coder")
    durations = _train(g, rng, 5000)
    node = g.index[(WAIT, "pytest")]
    pred = g.predict(node, 0.0, 50.0, RT)
    assert pred.expected_remaining_s == pytest.approx(durations.mean(), rel=0.08)
    assert pred.p_continue == pytest.approx(0.8, abs=0.02)
    assert pred.expected_next_tokens == pytest.approx(2000, rel=0.10)
    # conditional on having waited 15 s: E[D - 15 | D > 15]
    tail = durations[durations > 15.0] - 15.0
    later = g.predict(node, 15.0, 50.0, RT)
    assert later.expected_remaining_s == pytest.approx(tail.mean(), rel=0.15)
    # the early quantile is the 20th percentile of what remains (to within the
    # resolution of a √2-wide bucket at 15 s, ~5 s wide)
    assert later.early_remaining_s == pytest.approx(np.quantile(tail, 0.2), abs=0.6)
    assert pred.early_remaining_s == pytest.approx(np.quantile(durations, 0.2), rel=0.12)


def test_cold_start_uses_the_prior_and_a_hint_moves_it() -> None:
    prior = GraphPrior(tool_s=2.0, p_finish=0.05)
    g = AgentGraph("new", prior)
    node = g.node((WAIT, "search"), 0.0)
    cold = g.predict(node, 0.0, 0.0, RT)
    assert cold.p_continue == pytest.approx(0.95)
    assert 1.5 < cold.expected_remaining_s < 3.0
    hinted = g.predict(node, 0.0, 0.0, RT, hint_s=60.0)
    # the hint (4 observations' worth) outvotes the prior (2)
    assert hinted.expected_remaining_s > 35.0
    # a node created with a hint starts from the hint, not the default
    fresh = g.node((WAIT, "deploy"), 0.0, hint_s=120.0)
    assert g.predict(fresh, 0.0, 0.0, RT).expected_remaining_s > 80.0


def test_old_observations_age_out() -> None:
    g = AgentGraph("drift", GraphPrior(half_life_s=60.0))
    node = g.node((WAIT, "build"), 0.0)
    for i in range(200):
        g.observe_duration(node, 1.0, i * 0.1)
    assert g.predict(node, 0.0, 20.0, RT).expected_remaining_s < 1.5
    # the tool slows down; ten half-lives later the new regime dominates
    for i in range(50):
        g.observe_duration(node, 30.0, 600.0 + i * 0.1)
    assert g.predict(node, 0.0, 610.0, RT).expected_remaining_s == pytest.approx(
        g.mean_duration_s(node), rel=1e-9
    )
    assert 25.0 < g.mean_duration_s(node) < 40.0


def test_aging_rescales_without_changing_predictions() -> None:
    g = AgentGraph("long", GraphPrior(half_life_s=1.0))
    node = g.node((WAIT, "x"), 0.0)
    g.observe_duration(node, 5.0, 0.0)
    before = g.predict(node, 0.0, 0.0, RT).expected_remaining_s
    # 100 half-lives on, the weights are rescaled instead of overflowing
    g.observe_duration(node, 5.0, 100.0)
    assert np.isfinite(g.duration).all()
    assert g.duration.max() < 1e15
    # only the new observation counts: the bucket of 5 s, represented by its geometric mid
    after = g.predict(node, 0.0, 100.0, RT).expected_remaining_s
    assert after == pytest.approx(DURATION_BUCKETS.mids[DURATION_BUCKETS.index(5.0)], rel=1e-6)
    assert before != after  # at t=0 the prior still weighed in


def test_transitions_form_a_markov_graph() -> None:
    g = AgentGraph("coder")
    a = g.node((WAIT, "read"), 0.0)
    b = g.node((WAIT, "edit"), 0.0)
    for _ in range(3):
        g.observe_transition(a, b, 0.0)
    g.observe_transition(a, FINISH_NODE, 0.0)
    assert g.transition_probs(a) == {(WAIT, "edit"): 0.75, FINISH_KEY: 0.25}
    assert g.transition_probs(b) == {}


def test_tool_names_past_the_cap_share_one_node() -> None:
    from scheduler_service.graph.agent_graph import MAX_NODES, OTHER_TOOL

    g = AgentGraph("noisy")
    nodes = [g.node((WAIT, f"bash -c 'echo {i}'"), 0.0) for i in range(500)]
    assert len(g.keys) == MAX_NODES
    assert g.keys[-1] == (WAIT, OTHER_TOOL)
    assert len(set(nodes[MAX_NODES:])) == 1
    assert g.trans.shape == (MAX_NODES, MAX_NODES)
