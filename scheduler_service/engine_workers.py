"""Worker messages: Hello, disconnects, heartbeats, drains, KV events, inventories.

The worker is the truth about residency: a heartbeat resets the engine's
usage estimate, a KV event moves it, a complete inventory replaces it and
forgets whatever the worker no longer holds. After each, the worker is
checked for memory pressure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from scheduler_service.domain import (
    KvEvent,
    KvEventKind,
    PoolInventory,
    Rejected,
    SessionId,
    StaleEpoch,
    TenantId,
    Tier,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.retention import TIMER_LEASE, Retention
from scheduler_service.state import NO_TIMER, TIER_GPU, TIER_HOST, ClusterState

NewSession = Callable[[SessionId, TenantId, str, float], int]


class WorkerEvents:
    """Applies worker-side messages to the cluster state."""

    def __init__(self, state: ClusterState, retention: Retention) -> None:
        self.state = state
        self.retention = retention

    def require(self, worker_id: WorkerId, what: str) -> int:
        """The worker's slot; Rejected when the worker is unknown."""
        w = self.state.workers.slot_of.get(worker_id)
        if w is None:
            raise Rejected("worker_id", f"{what} from unknown worker {worker_id!r}")
        return w

    def register(self, spec: WorkerSpec) -> tuple[int, bool]:
        """Record a Hello; (slot, whether it is a known worker's new epoch).

        Raises StaleEpoch for an epoch older than the known one.
        """
        ws = self.state.workers
        w = ws.slot_of.get(spec.worker_id)
        if w is not None and spec.epoch < ws.epoch_v[w]:
            raise StaleEpoch(spec.worker_id, spec.epoch, int(ws.epoch_v[w]))
        restarted = w is not None and spec.epoch > ws.epoch_v[w]
        if w is None:
            w = ws.add(spec.worker_id)
        elif restarted:
            # a restarted worker holds nothing: its sessions keep it as home
            # (affinity) but their KV is gone
            for s in self.state.residents_of(w):
                self.state.forget(s)
            for name in (
                "gpu_used_blocks",
                "host_used_blocks",
                "pending_free_blocks",
                "queued_prefill_tokens",
                "running_steps",
            ):
                getattr(ws, name)[w] = 0
            ws.draining_v[w] = False
            ws.kv_feed_v[w] = False
            ws.price_at_decision_v[w] = 0.0
        self.state.set_worker_spec(w, spec)
        ws.connected_v[w] = True
        ws.live_v[w] = not ws.draining_v[w]
        return w, restarted

    def disconnected(self, worker_id: WorkerId) -> None:
        """The worker's stream closed; its KV may still be there."""
        ws = self.state.workers
        w = ws.slot_of.get(worker_id)
        if w is not None:
            ws.connected_v[w] = False
            ws.live_v[w] = False

    def drain(self, worker_id: WorkerId) -> int:
        """Stop placing steps on the worker; KeyError when unknown."""
        ws = self.state.workers
        w = ws.slot_of.get(worker_id)
        if w is None:
            raise KeyError(worker_id)
        ws.draining_v[w] = True
        ws.live_v[w] = False
        return w

    def heartbeat(self, worker_id: WorkerId, load: WorkerLoad, now: float) -> None:
        """Adopt the worker's usage and load, then react to the pressure."""
        ws = self.state.workers
        w = self.require(worker_id, "heartbeat")
        ws.gpu_used_blocks_v[w] = max(0, int(ws.gpu_cap_blocks_v[w]) - load.gpu_free_blocks)
        if ws.host_cap_blocks_v[w] > 0:
            ws.host_used_blocks_v[w] = max(0, int(ws.host_cap_blocks_v[w]) - load.host_free_blocks)
        ws.pending_free_blocks_v[w] = 0
        ws.queued_prefill_tokens_v[w] = load.queued_prefill_tokens
        ws.running_steps_v[w] = load.running_steps
        self.retention.relieve(w, now)
        self.retention.redecide_if_pricier(w, now)

    def kv_events(self, worker_id: WorkerId, events: Iterable[KvEvent], now: float) -> None:
        """Move the usage estimate by the worker's block events."""
        ws = self.state.workers
        w = self.require(worker_id, "kv_events")
        ws.kv_feed_v[w] = True
        for ev in events:
            n = len(ev.block_hashes)
            on_gpu = ev.tier is Tier.GPU
            if ev.kind is KvEventKind.STORED:
                if on_gpu:
                    ws.gpu_used_blocks_v[w] += n
                else:
                    ws.host_used_blocks_v[w] += n
            elif ev.kind is KvEventKind.REMOVED:
                if on_gpu:
                    expected = min(n, int(ws.pending_free_blocks_v[w]))
                    ws.pending_free_blocks_v[w] -= expected
                    ws.gpu_used_blocks_v[w] = max(0, int(ws.gpu_used_blocks_v[w]) - (n - expected))
                else:
                    ws.host_used_blocks_v[w] = max(0, int(ws.host_used_blocks_v[w]) - n)
            else:
                self._cleared(w, TIER_GPU if on_gpu else TIER_HOST)
        self.retention.relieve(w, now)

    def _cleared(self, w: int, tier: int) -> None:
        ws, ss = self.state.workers, self.state.sessions
        if tier == TIER_GPU:
            ws.gpu_used_blocks_v[w] = 0
            ws.pending_free_blocks_v[w] = 0
        else:
            ws.host_used_blocks_v[w] = 0
        for s in self.state.residents_of(w):
            if ss.tier_v[s] == tier:
                self.state.forget(s)

    def reconcile(
        self, worker_id: WorkerId, inv: PoolInventory, now: float, new_session: NewSession
    ) -> None:
        """Replace the engine's view of the worker with its inventory."""
        ws, ss = self.state.workers, self.state.sessions
        w = self.require(worker_id, "pool_snapshot")
        ws.gpu_used_blocks_v[w] = inv.gpu_used_blocks
        ws.host_used_blocks_v[w] = inv.host_used_blocks
        ws.pending_free_blocks_v[w] = 0
        if inv.complete:
            held = {r.session_id for r in inv.sessions}
            for s in self.state.residents_of(w):
                if ss.ids[s] not in held:
                    self.state.forget(s)
        for r in inv.sessions:
            known = ss.slot_of.get(r.session_id)
            s = new_session(r.session_id, r.tenant_id, "", now) if known is None else known
            self.state.link(s, w)
            self.state.set_residency(s, r.gpu_blocks, r.host_blocks)
            ss.context_tokens_v[s] = max(int(ss.context_tokens_v[s]), r.cached_tokens)
            ss.prefetch_at_s_v[s] = 0.0
            if r.lease_remaining_s > 0 and ss.tier_v[s] == TIER_GPU:
                ss.lease_expires_s_v[s] = now + r.lease_remaining_s
                self.retention.set_timer(s, now + r.lease_remaining_s, TIMER_LEASE)
            else:
                ss.lease_expires_s_v[s] = 0.0
                ss.timer_due_s_v[s] = NO_TIMER
        self.retention.relieve(w, now)
