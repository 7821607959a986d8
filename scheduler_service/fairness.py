"""Agent Fair Share, first version: tenants share task completions, not GPU time.

Each finished session's slowdown is its wall time over its standalone time
(the prefill of the tokens it actually added plus the tools it waited on). A
tenant's slowdown is an exponentially weighted mean of its sessions'. A tenant
whose weighted slowdown is above the cluster's mean gets a higher step
priority and more protection from eviction, which pulls the slowdowns of
backlogged tenants toward each other.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import TenantId
from scheduler_service.state import Interned

#: Weight of the newest completion in a tenant's mean slowdown.
SLOWDOWN_SMOOTHING = 0.1
#: Step priorities run 0..MAX_PRIORITY; a tenant at the mean gets the middle.
MAX_PRIORITY = 100
#: Protection (the divisor of a session's eviction key) stays within these bounds.
MIN_PROTECTION, MAX_PROTECTION = 0.5, 4.0


class FairShare:
    """Per-tenant slowdown, weight, step priority and eviction protection."""

    def __init__(self) -> None:
        self.tenants: Interned[TenantId] = Interned()
        self.weight: list[float] = []
        self.slowdown: list[float] = []
        self.completed: list[int] = []
        self.events: list[int] = []
        self.protection: npt.NDArray[np.float64] = np.ones(16, dtype=np.float64)
        self.priority: list[int] = []  # step priority per tenant slot, kept current

    def slot(self, tenant_id: TenantId) -> int:
        """The tenant's dense slot (tenants are interned on first sight)."""
        t = self.tenants.get(tenant_id)
        if t == len(self.weight):
            self.weight.append(1.0)
            self.slowdown.append(1.0)
            self.completed.append(0)
            self.events.append(0)
            self.priority.append(MAX_PRIORITY // 2)
            if t >= self.protection.shape[0]:
                grown = np.ones(self.protection.shape[0] * 2, dtype=np.float64)
                grown[:t] = self.protection[:t]
                self.protection = grown
        return t

    def set_weight(self, tenant_id: TenantId, weight: float) -> None:
        """Apply a tenant's configured weight (non-positive means 1)."""
        t = self.slot(tenant_id)
        self.weight[t] = weight if weight > 0 else 1.0
        self._refresh()

    def record_completion(self, t: int, elapsed_s: float, standalone_s: float) -> None:
        """A session of tenant slot ``t`` finished after ``elapsed_s``."""
        slowdown = max(1.0, elapsed_s / max(standalone_s, 1e-3))
        self.completed[t] += 1
        if self.completed[t] == 1:
            self.slowdown[t] = slowdown
        else:
            self.slowdown[t] += SLOWDOWN_SMOOTHING * (slowdown - self.slowdown[t])
        self._refresh()

    def step_priority(self, t: int) -> int:
        """Priority for a step of tenant slot ``t`` (higher runs sooner)."""
        if t < 0 or t >= len(self.priority):
            return MAX_PRIORITY // 2
        return self.priority[t]

    def mean_slowdown(self, t: int) -> float:
        """The tenant's smoothed slowdown (0 before any completion)."""
        return self.slowdown[t] if self.completed[t] else 0.0

    def _refresh(self) -> None:
        # Weighted slowdown relative to the mean over tenants that completed work.
        active = [i for i, c in enumerate(self.completed) if c]
        if not active:
            return
        # a heavier tenant is owed more: the same slowdown hurts it more
        norm = {i: self.slowdown[i] * self.weight[i] for i in active}
        mean = sum(norm.values()) / len(norm)
        for i, v in norm.items():
            rel = min(MAX_PROTECTION, max(MIN_PROTECTION, v / mean))
            self.protection[i] = rel
            self.priority[i] = max(0, min(MAX_PRIORITY, round(MAX_PRIORITY / 2 * rel)))
