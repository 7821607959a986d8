"""SGLang integration: session open/close events and retention as radix-cache priority.

SGLang evicts radix-cache leaves by a priority key (its eviction strategies are
small classes whose only job is that key). `SglangRetention` is the KVPool the
WorkerClient drives: directives become per-session protection levels, and
`eviction_key(session_id, last_access_s, now)` is what a custom strategy returns
for a node owned by that session, so leased sessions are evicted last and
EVICT_NOW sessions first. Leases end by themselves at their TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.pool_api import DirectiveResult

__all__ = ["SglangRetention", "session_close_event", "session_open_event"]

#: Protection levels; higher = evicted later.
EVICT_FIRST, NORMAL, LEASED = -1, 0, 1


@dataclass(slots=True)
class _State:
    level: int
    expiry_s: float
    priority: int = 0


class SglangRetention:
    """Per-session eviction protection for SGLang's radix cache (see module doc)."""

    def __init__(self, spec: types_pb2.CacheSpec, free_blocks: Callable[[], int] = lambda: 0):
        self._spec = spec
        self._free_blocks = free_blocks
        self._sessions: dict[str, _State] = {}

    def eviction_key(
        self, session_id: str, last_access_s: float, now: float
    ) -> tuple[int, int, float]:
        """Returns the sort key for a radix node of this session (smallest evicted first)."""
        st = self._sessions.get(session_id)
        if st is None or st.expiry_s <= now:
            return (NORMAL, 0, last_access_s)
        return (st.level, st.priority, last_access_s)

    def cache_spec(self) -> types_pb2.CacheSpec:
        """Returns the cache declared in Hello."""
        return self._spec

    def apply_directive(
        self, directive: worker_pb2.RetentionDirective, now: float
    ) -> DirectiveResult:
        """RETAIN_GPU protects until the TTL; RELEASE unprotects; EVICT_NOW demotes."""
        a, sid = directive.action, directive.session_id
        if a == worker_pb2.RETAIN_GPU:
            if not directive.lease_ttl_s > 0:
                return DirectiveResult.rejected("RETAIN_GPU needs lease_ttl_s > 0")
            self._sessions[sid] = _State(LEASED, now + directive.lease_ttl_s, directive.priority)
        elif a == worker_pb2.RELEASE:
            self._sessions.pop(sid, None)
        elif a == worker_pb2.EVICT_NOW:
            # Until the next eviction pass takes it; a short window is enough.
            self._sessions[sid] = _State(EVICT_FIRST, now + 60.0)
        elif a in (worker_pb2.OFFLOAD_HOST, worker_pb2.PREFETCH_GPU):
            return DirectiveResult.rejected("host-tier moves need SGLang HiCache; not wired")
        else:
            return DirectiveResult.rejected(f"unknown action {a}")
        return DirectiveResult.applied()

    def expire_leases(self, now: float) -> int:
        """Drops every protection whose TTL has passed."""
        ended = [sid for sid, st in self._sessions.items() if st.expiry_s <= now]
        for sid in ended:
            del self._sessions[sid]
        return len(ended)

    def snapshot(self, now: float) -> worker_pb2.PoolSnapshot:
        """Returns the protected sessions; incomplete (the radix tree is not listed)."""
        return worker_pb2.PoolSnapshot(
            gpu_used_blocks=self._spec.gpu_capacity_blocks - self._free_blocks(),
            sessions=[
                worker_pb2.SessionResidency(
                    session_id=sid,
                    lease_remaining_s=max(0.0, st.expiry_s - now) if st.level == LEASED else 0.0,
                )
                for sid, st in self._sessions.items()
            ],
            complete=False,
        )

    def heartbeat(self, now: float) -> worker_pb2.Heartbeat:
        """Returns the free blocks SGLang reports."""
        return worker_pb2.Heartbeat(gpu_free_blocks=self._free_blocks())

    def take_kv_events(self) -> list[types_pb2.KvEvent]:
        """Returns nothing: SGLang's KV events come through its own publisher."""
        return []


def session_open_event(session_id: str, tenant_id: str, agent_type: str) -> types_pb2.SessionEvent:
    """Returns the event for SGLang `open_session` (the first step is about to start)."""
    from kvsched_client.worker import session_event

    return session_event(
        session_id, types_pb2.STEP_START, tenant_id=tenant_id, agent_type=agent_type
    )


def session_close_event(
    session_id: str, tenant_id: str, aborted: bool = False
) -> types_pb2.SessionEvent:
    """Returns the event for SGLang `close_session` (the task is over; its KV can go)."""
    from kvsched_client.worker import session_event

    kind = types_pb2.SESSION_ABORT if aborted else types_pb2.SESSION_FINISH
    return session_event(session_id, kind, tenant_id=tenant_id)
