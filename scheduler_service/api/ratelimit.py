"""Per-tenant admission: a token bucket per tenant at its ``event_rate_limit_per_s``.

Admission is not engine state: it is decided at the edge with the server's clock
and never journaled (a replay must apply exactly what was admitted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler_service.domain import TenantId, TenantSpec


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


class TenantRateLimiter:
    """Buckets refill at the tenant's rate and hold one second of burst."""

    def __init__(self, tenant: Callable[[TenantId], TenantSpec | None]) -> None:
        self._tenant = tenant
        self._buckets: dict[TenantId, _Bucket] = {}

    def admit(self, tenant_id: TenantId, cost: float, now: float) -> float | None:
        """None when admitted (and charged); else seconds until ``cost`` would fit."""
        spec = self._tenant(tenant_id)
        rate = spec.event_rate_limit_per_s if spec is not None else 0.0
        if rate <= 0:
            return None
        burst = max(rate, cost)
        b = self._buckets.get(tenant_id)
        if b is None:
            b = self._buckets[tenant_id] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.updated_s) * rate)
        b.updated_s = now
        if b.tokens >= cost:
            b.tokens -= cost
            return None
        return (cost - b.tokens) / rate
