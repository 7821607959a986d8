"""Kernel: the per-event part of validating a batch given as columns.

``engine_checks.check_columns`` runs it over the compiled batch path's
columns; on ``False`` it runs ``check_events``, which names the bad field.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def columns_valid(
    slots: np.ndarray,
    context_tokens: np.ndarray,
    new_tokens: np.ndarray,
    step_index: np.ndarray,
    hints_s: np.ndarray,
    tenants: np.ndarray,
    plain: np.ndarray,
    tenant_of_slot: np.ndarray,
) -> bool:
    """False when an event has a negative count, a latency hint that is not a
    finite number >= 0, or (a ``plain`` event: its session exists and neither
    starts nor ends in the batch) a tenant other than its session's owner."""
    for i in range(slots.shape[0]):
        if context_tokens[i] < 0 or new_tokens[i] < 0 or step_index[i] < 0:
            return False
        if not 0.0 <= hints_s[i] < math.inf:  # NaN compares false
            return False
        if plain[i] and tenant_of_slot[slots[i]] != tenants[i]:
            return False
    return True
