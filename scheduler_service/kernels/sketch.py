"""Kernel: what a log-bucket duration sketch says about the time still to wait.

Given a histogram of observed durations (bucket masses, aged), the buckets'
upper edges and representative values, and the time already waited, return
the conditional mean of the remaining time, a low quantile of it (when to
start a prefetch) and the mass that is still compatible with the wait.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# NOTE: no fastmath anywhere in kernels/: the twins in reference.py must agree
# bit for bit, and reassociated sums would not.


@njit(cache=True, inline="always")
def remaining_time(
    hist: np.ndarray,
    upper_edges: np.ndarray,
    mids: np.ndarray,
    waited_s: float,
    quantile: float,
) -> tuple[float, float, float]:
    """(mean remaining s, ``quantile`` remaining s, surviving mass) given ``waited_s``."""
    n = hist.shape[0]
    mass = 0.0
    acc = 0.0
    for b in range(n):
        if upper_edges[b] <= waited_s or hist[b] <= 0.0:
            continue
        v = mids[b]
        if v < waited_s:
            # the bucket straddles the wait: what is left of it is [waited, upper)
            v = 0.5 * (waited_s + upper_edges[b])
        mass += hist[b]
        acc += hist[b] * (v - waited_s)
    if mass <= 0.0:
        # NOTE: waited longer than anything seen: assume as long again (Lindy),
        # the conservative guess for heavy-tailed tool latencies.
        return waited_s, waited_s, 0.0
    # the quantile interpolates linearly inside its bucket (the open last
    # bucket uses its representative): an early estimate must not overshoot
    target = quantile * mass
    cum = 0.0
    q_value = 0.0
    for b in range(n):
        if upper_edges[b] <= waited_s or hist[b] <= 0.0:
            continue
        lower = upper_edges[b - 1] if b > 0 else 0.0
        if lower < waited_s:
            lower = waited_s
        if cum + hist[b] >= target:
            if upper_edges[b] == np.inf:
                q_value = max(mids[b], lower) - waited_s
            else:
                q_value = lower + (upper_edges[b] - lower) * ((target - cum) / hist[b]) - waited_s
            break
        cum += hist[b]
    return acc / mass, q_value, mass
