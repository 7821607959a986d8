"""Tenant limits: KV quotas and concurrent sessions, by tenant slot.

The limits come from ``TenantSpec`` (0 means unlimited); the usage they are
checked against is what ``ClusterState`` counts per tenant as blocks move, so
every check here is a couple of list reads. Limits are engine state set by
journaled tenant records, never by a clock, so a replay enforces alike.
"""

from __future__ import annotations

from scheduler_service.domain import TenantSpec
from scheduler_service.state import ClusterState


class TenantQuotas:
    """Per-tenant-slot limits and the checks retention and admission make."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.gpu_bytes: list[int] = []
        self.host_bytes: list[int] = []
        self.max_sessions: list[int] = []
        #: slots with a GPU quota, ascending: the only ones that can be over it
        self.gpu_limited: list[int] = []

    def set(self, t: int, spec: TenantSpec | None) -> None:
        """Adopt tenant slot ``t``'s limits (None: the tenant is gone, no limits)."""
        while len(self.gpu_bytes) <= t:
            self.gpu_bytes.append(0)
            self.host_bytes.append(0)
            self.max_sessions.append(0)
        self.state.ensure_tenant(t)
        self.gpu_bytes[t] = max(0, spec.kv_quota_gpu_bytes) if spec else 0
        self.host_bytes[t] = max(0, spec.kv_quota_host_bytes) if spec else 0
        self.max_sessions[t] = max(0, spec.max_concurrent_sessions) if spec else 0
        self.gpu_limited = [i for i, q in enumerate(self.gpu_bytes) if q > 0]

    def gpu_quota(self, t: int) -> int:
        """Tenant slot ``t``'s GPU KV quota in bytes (0: unlimited)."""
        return self.gpu_bytes[t] if 0 <= t < len(self.gpu_bytes) else 0

    def host_quota(self, t: int) -> int:
        """Tenant slot ``t``'s host KV quota in bytes (0: unlimited)."""
        return self.host_bytes[t] if 0 <= t < len(self.host_bytes) else 0

    def over_gpu(self, t: int) -> bool:
        """True when tenant slot ``t`` holds more GPU KV than its quota."""
        q = self.gpu_quota(t)
        return q > 0 and self.state.tenant_gpu_bytes[t] > q

    def gpu_allows(self, t: int, extra_bytes: int) -> bool:
        """True when ``extra_bytes`` more GPU KV keeps tenant slot ``t`` within its quota."""
        q = self.gpu_quota(t)
        return q <= 0 or self.state.tenant_gpu_bytes[t] + extra_bytes <= q

    def host_allows(self, t: int, extra_bytes: int) -> bool:
        """True when ``extra_bytes`` more host KV keeps tenant slot ``t`` within its quota."""
        q = self.host_quota(t)
        return q <= 0 or self.state.tenant_host_bytes[t] + extra_bytes <= q

    def over_gpu_tenants(self) -> list[int]:
        """Tenant slots over their GPU quota, ascending."""
        used = self.state.tenant_gpu_bytes
        return [t for t in self.gpu_limited if used[t] > self.gpu_bytes[t]]

    def session_limit(self, t: int) -> int:
        """Tenant slot ``t``'s max_concurrent_sessions (0: unlimited)."""
        return self.max_sessions[t] if 0 <= t < len(self.max_sessions) else 0

    def at_session_limit(self, t: int) -> bool:
        """True when tenant slot ``t`` may not open another session now."""
        limit = self.session_limit(t)
        return limit > 0 and self.state.tenant_sessions[t] >= limit
