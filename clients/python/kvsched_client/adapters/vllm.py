"""vLLM integration.

* `decode_kv_events(payload)` and the `kvsched-bridge vllm` KV-event bridge
  (vllm_events.py, vllm_bridge.py);
* a v1 KV connector (`KVConnectorBase_V1`), built by `connector_class()` so that
  vLLM is imported only when the connector is actually used. Its scheduler side
  reports step start / end / tool waits and, through `request_finished`, delays
  freeing the blocks of a session under a RETAIN_GPU lease; its worker side hands
  the held requests back (`get_finished`) when the lease ends.

The request carries its session in `kv_transfer_params` (set per request by the
agent framework): `{"kvsched": {"session_id", "tenant_id", "agent_type",
"step_index", "tool_name"}}`; a request without it is served as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.adapters.vllm_events import decode_kv_events
from kvsched_client.pool_api import DirectiveResult

__all__ = ["LeaseLedger", "RequestSession", "connector_class", "decode_kv_events"]


@dataclass(frozen=True, slots=True)
class RequestSession:
    """The agent session a vLLM request belongs to (from its kv_transfer_params)."""

    session_id: str
    tenant_id: str = "default"
    agent_type: str = "agent"
    step_index: int = 0
    tool_name: str = ""

    @staticmethod
    def from_params(params: Mapping[str, Any] | None) -> RequestSession | None:
        """Returns the session named in kv_transfer_params, or None."""
        p = (params or {}).get("kvsched")
        if not isinstance(p, Mapping) or not p.get("session_id"):
            return None
        return RequestSession(
            session_id=str(p["session_id"]),
            tenant_id=str(p.get("tenant_id") or "default"),
            agent_type=str(p.get("agent_type") or "agent"),
            step_index=int(p.get("step_index") or 0),
            tool_name=str(p.get("tool_name") or ""),
        )


@dataclass(slots=True)
class _Lease:
    expiry_s: float
    requests: dict[str, int] = field(default_factory=dict)  # held request id -> blocks


class LeaseLedger:
    """The KVPool a vLLM scheduler-side connector exposes to WorkerClient.

    vLLM owns the blocks; the ledger only decides which finished requests keep
    theirs (a request whose session holds a lease) and when they are let go.
    Offload and prefetch need an offloading connector beside this one; without
    it they are rejected with a reason, and the scheduler falls back to RELEASE.
    """

    def __init__(
        self,
        spec: types_pb2.CacheSpec,
        free_blocks: Callable[[], int] = lambda: 0,
        offload_enabled: bool = False,
    ) -> None:
        self._spec = spec
        self._free_blocks = free_blocks
        self._offload_enabled = offload_enabled
        self._leases: dict[str, _Lease] = {}
        self._due: list[str] = []  # held requests whose blocks may be freed now
        self.running: set[str] = set()

    # -- connector side ------------------------------------------------------------------

    def request_finished(self, req_id: str, session_id: str, n_blocks: int, now: float) -> bool:
        """Returns True when the request's blocks must outlive it (a live lease)."""
        self.running.discard(req_id)
        lease = self._leases.get(session_id)
        if lease is None or lease.expiry_s <= now:
            return False
        lease.requests[req_id] = n_blocks
        return True

    def step_started(self, session_id: str) -> None:
        """The session's next step holds its own refs: the old request can go."""
        self._end(session_id)

    def take_due(self, now: float) -> list[str]:
        """Returns (once) the held requests whose lease has ended."""
        self.expire_leases(now)
        due, self._due = self._due, []
        return due

    # -- KVPool --------------------------------------------------------------------------

    def cache_spec(self) -> types_pb2.CacheSpec:
        """Returns the cache declared in Hello."""
        return self._spec

    def apply_directive(
        self, directive: worker_pb2.RetentionDirective, now: float
    ) -> DirectiveResult:
        """RETAIN_GPU opens a lease; RELEASE / EVICT_NOW end it; see class doc."""
        a, sid = directive.action, directive.session_id
        if a == worker_pb2.RETAIN_GPU:
            if not directive.lease_ttl_s > 0:
                return DirectiveResult.rejected("RETAIN_GPU needs lease_ttl_s > 0")
            lease = self._leases.setdefault(sid, _Lease(0.0))
            lease.expiry_s = now + directive.lease_ttl_s
            return DirectiveResult.applied()
        if a in (worker_pb2.RELEASE, worker_pb2.EVICT_NOW):
            self._end(sid)
            return DirectiveResult.applied()
        if a in (worker_pb2.OFFLOAD_HOST, worker_pb2.PREFETCH_GPU):
            if not self._offload_enabled:
                return DirectiveResult.rejected("no offloading connector configured")
            # The offloading connector keeps a host copy of every block it saved;
            # ending the lease lets vLLM free the GPU copy.
            if a == worker_pb2.OFFLOAD_HOST:
                self._end(sid)
            return DirectiveResult.applied()
        return DirectiveResult.rejected(f"unknown action {a}")

    def expire_leases(self, now: float) -> int:
        """Ends every lease whose TTL has passed."""
        ended = [sid for sid, lease in self._leases.items() if lease.expiry_s <= now]
        for sid in ended:
            self._end(sid)
        return len(ended)

    def snapshot(self, now: float) -> worker_pb2.PoolSnapshot:
        """Returns the leased sessions; incomplete (vLLM's prefix cache is not listed)."""
        return worker_pb2.PoolSnapshot(
            gpu_used_blocks=self._spec.gpu_capacity_blocks - self._free_blocks(),
            sessions=[
                worker_pb2.SessionResidency(
                    session_id=sid,
                    gpu_blocks=sum(lease.requests.values()),
                    lease_remaining_s=max(0.0, lease.expiry_s - now),
                    cached_tokens=sum(lease.requests.values()) * self._spec.block_size_tokens,
                )
                for sid, lease in self._leases.items()
            ],
            complete=False,
        )

    def heartbeat(self, now: float) -> worker_pb2.Heartbeat:
        """Returns free blocks as vLLM counts them, and running steps."""
        return worker_pb2.Heartbeat(
            gpu_free_blocks=self._free_blocks(), running_steps=len(self.running)
        )

    def take_kv_events(self) -> list[types_pb2.KvEvent]:
        """Returns nothing: vLLM's own KV events come through the bridge."""
        return []

    def _end(self, session_id: str) -> None:
        lease = self._leases.pop(session_id, None)
        if lease is not None:
            self._due.extend(lease.requests)


def connector_class() -> type:
    """Returns the KVConnectorBase_V1 subclass (imports vLLM; see vllm_connector)."""
    from kvsched_client.adapters.vllm_connector import build_connector_class

    return build_connector_class()
