"""Kernels: which workers' waiting leases to re-price, which leases on one, and
the work in flight per tenant.

``Engine.tick`` re-prices the leases of waiting sessions on every worker whose
shadow price rose past ``ratio`` times the price its leases were set at (the
memory got scarcer since). ``pricier_workers`` prices every worker at once
(``Retention.shadow_price``'s formula) and lists those; ``leases_priced_below``
walks one worker's residents for the leases granted below a price.
``live_work`` sums fair share's in-flight figures over every session. Each is
a scan the engine would otherwise make in Python or with several numpy passes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

STATE_TOOL_WAIT = 2
TIER_GPU = 1
NO_SLOT = -1
PREFETCHED = -1.0
#: a price counts as risen only past this much above ``ratio`` × the old one
PRICE_EPSILON = 1e-9


@njit(cache=True, inline="always")
def shadow_price(
    cap: int,
    used: int,
    queued_tokens: int,
    prefill_tokens_per_s: float,
    idle_utilization: float,
    max_price: float,
    demand_weight: float,
    demand_horizon_s: float,
) -> float:
    """``Retention.shadow_price`` of one worker (the event kernel's and ``pricier_workers``')."""
    if cap <= 0:
        return max_price
    over = (used / cap - idle_utilization) / (1.0 - idle_utilization)
    if over < 0.0:
        over = 0.0
    if over > 1.0:
        over = 1.0
    demand_s = queued_tokens / prefill_tokens_per_s
    return max_price * (over * over) + demand_weight * demand_s / (demand_s + demand_horizon_s)


@njit(cache=True)
def pricier_workers(
    cap: np.ndarray,
    used: np.ndarray,
    queued_tokens: np.ndarray,
    prefill_tokens_per_s: np.ndarray,
    residents: np.ndarray,
    connected: np.ndarray,
    before: np.ndarray,
    idle_utilization: float,
    max_price: float,
    demand_weight: float,
    demand_horizon_s: float,
    ratio: float,
    out: np.ndarray,
) -> int:
    """Workers (of the first ``len(before)``) whose shadow price now exceeds ``ratio`` ×
    ``before`` and that have residents and are connected, into ``out``; returns how
    many. ``before`` falls to the price now where that is lower (NaN wins, as in
    ``np.minimum``).
    """
    k = 0
    for w in range(before.shape[0]):
        price = shadow_price(
            cap[w], used[w], queued_tokens[w], prefill_tokens_per_s[w], idle_utilization,
            max_price, demand_weight, demand_horizon_s,
        )  # fmt: skip
        b = before[w]
        if price > b * ratio + PRICE_EPSILON and residents[w] > 0 and connected[w]:
            out[k] = w
            k += 1
        if price < b or price != price:
            before[w] = price
    return k


@njit(cache=True)
def leases_priced_below(
    head: int,
    next_slot: np.ndarray,
    price_at_grant: np.ndarray,
    state: np.ndarray,
    tier: np.ndarray,
    node: np.ndarray,
    prefetch_at_s: np.ndarray,
    floor: float,
    out: np.ndarray,
) -> int:
    """Residents from ``head`` on (in list order) waiting in a graph node with a lease on
    the GPU granted at a price below ``floor``, not reloaded for their use, into
    ``out``; returns how many."""
    k = 0
    s = head
    while s != NO_SLOT:
        if (
            price_at_grant[s] < floor
            and state[s] == STATE_TOOL_WAIT
            and tier[s] == TIER_GPU
            and node[s] != NO_SLOT
            and prefetch_at_s[s] != PREFETCHED
        ):
            out[k] = s
            k += 1
        s = next_slot[s]
    return k


@njit(cache=True)
def live_work(
    tenant: np.ndarray,
    started_s: np.ndarray,
    ideal_s: np.ndarray,
    now: float,
    elapsed_out: np.ndarray,
    ideal_out: np.ndarray,
) -> None:
    """Per tenant slot (below ``len(elapsed_out)``), the summed time in flight and
    standalone work of its live sessions (``tenant`` >= 0), summed in slot order."""
    elapsed_out[:] = 0.0
    ideal_out[:] = 0.0
    n = elapsed_out.shape[0]
    for s in range(tenant.shape[0]):
        t = tenant[s]
        if 0 <= t < n:
            elapsed_out[t] += now - started_s[s]
            ideal_out[t] += ideal_s[s]
