"""The decision engine: the one entry point the service, simulator and load test drive.

Time is an argument: every method takes ``now`` (seconds) and the engine never
reads a clock, so a journal replay or a simulation reproduces every decision.

This is the foundation engine: it tracks workers, sessions and tenants and
answers Place with the session's home worker (affinity) or the least-loaded
worker, and releases a finished session's KV. The agent execution graph,
numba kernels and cost-based retention fill in behind this same interface.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from scheduler_service.domain import (
    NO_DECISIONS,
    Action,
    Candidate,
    ClusterStatsView,
    Decisions,
    DirectiveId,
    DirectiveOutcome,
    EventKind,
    KvEvent,
    KvEventKind,
    Placement,
    PlaceRequest,
    PoolInventory,
    Rejected,
    RetentionDirective,
    SessionEvent,
    SessionId,
    SessionState,
    SessionView,
    StaleEpoch,
    TenantId,
    TenantSpec,
    TenantStatsView,
    Tier,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
    WorkerView,
)

_DONE_KINDS = (EventKind.SESSION_FINISH, EventKind.SESSION_ABORT)


@dataclass(slots=True)
class EngineConfig:
    """Engine knobs (defaults suit a vLLM-like fleet)."""

    affinity_ttl_s: float = 30.0
    max_candidates: int = 16
    # NOTE: retained sessions are leased, never pinned; this is the lease the
    # foundation engine grants at TOOL_CALL_WAIT before cost-based retention lands.
    default_lease_ttl_s: float = 10.0


@dataclass(slots=True)
class _Worker:
    spec: WorkerSpec
    connected: bool = True
    draining: bool = False
    load: WorkerLoad | None = None
    gpu_used_blocks: int = 0
    sessions: set[SessionId] = field(default_factory=set)


@dataclass(slots=True)
class _Session:
    session_id: SessionId
    tenant_id: TenantId
    agent_type: str
    home: WorkerId | None = None
    tier: Tier = Tier.NONE
    state: SessionState = SessionState.IDLE
    step_index: int = 0
    context_tokens: int = 0
    last_event_s: float = 0.0
    lease_expires_s: float = 0.0
    events: int = 0


@dataclass(slots=True)
class _TenantCounters:
    completed_sessions: int = 0
    events: int = 0


class Engine:
    """Tracks the cluster and decides placement and retention."""

    def __init__(self, config: EngineConfig | None = None, leader_epoch: int = 1) -> None:
        self.config = config or EngineConfig()
        self.leader_epoch = leader_epoch
        self._workers: dict[WorkerId, _Worker] = {}
        self._sessions: dict[SessionId, _Session] = {}
        self._tenants: dict[TenantId, TenantSpec] = {}
        self._tenant_counters: dict[TenantId, _TenantCounters] = {}
        self._directive_seq = itertools.count(1)
        self._events_total = 0
        self._placements_total = 0
        self._directives_total = 0

    # -- workers -------------------------------------------------------------

    def register_worker(self, spec: WorkerSpec, now: float) -> Decisions:
        """Record a worker's Hello; a new epoch means it holds nothing any more."""
        known = self._workers.get(spec.worker_id)
        if known is not None and spec.epoch < known.spec.epoch:
            raise StaleEpoch(spec.worker_id, spec.epoch, known.spec.epoch)
        if known is None or spec.epoch > known.spec.epoch:
            if known is not None:
                self._forget_residency(known)
            self._workers[spec.worker_id] = _Worker(spec=spec)
        else:
            known.spec = spec
            known.connected = True
        return NO_DECISIONS

    def worker_epoch(self, worker_id: WorkerId) -> int | None:
        """The current epoch of a worker, or None when unknown."""
        w = self._workers.get(worker_id)
        return None if w is None else w.spec.epoch

    def worker_disconnected(self, worker_id: WorkerId, now: float) -> None:
        """Mark a worker's stream closed (its KV may still be there)."""
        w = self._workers.get(worker_id)
        if w is not None:
            w.connected = False

    def heartbeat(self, worker_id: WorkerId, load: WorkerLoad, now: float) -> Decisions:
        """Record a worker's load figures."""
        w = self._require_worker(worker_id, "heartbeat")
        w.load = load
        w.gpu_used_blocks = max(0, w.spec.cache.gpu_capacity_blocks - load.gpu_free_blocks)
        return NO_DECISIONS

    def drain_worker(self, worker_id: WorkerId, now: float) -> WorkerView:
        """Stop placing steps on a worker."""
        w = self._workers.get(worker_id)
        if w is None:
            raise KeyError(worker_id)
        w.draining = True
        return self._worker_view(w)

    # -- session events --------------------------------------------------------

    def check_events(self, events: Sequence[SessionEvent]) -> None:
        """Raise Rejected if any event of the batch is invalid; changes nothing."""
        created: set[SessionId] = set()
        for i, ev in enumerate(events):
            prefix = f"events[{i}]"
            if ev.context_tokens < 0:
                raise Rejected(f"{prefix}.context_tokens", "must be >= 0")
            if ev.new_tokens < 0:
                raise Rejected(f"{prefix}.new_tokens", "must be >= 0")
            if ev.worker_id and ev.worker_id not in self._workers:
                raise Rejected(f"{prefix}.worker_id", f"unknown worker {ev.worker_id!r}")
            known = ev.session_id in self._sessions or ev.session_id in created
            if not known and ev.kind not in (EventKind.STEP_START, EventKind.SESSION_ABORT):
                raise Rejected(
                    f"{prefix}.session_id",
                    f"unknown session {ev.session_id!r}: its first event must be STEP_START",
                )
            s = self._sessions.get(ev.session_id)
            if s is not None and s.tenant_id != ev.tenant_id:
                raise Rejected(
                    f"{prefix}.tenant_id",
                    f"session {ev.session_id!r} belongs to another tenant",
                )
            created.add(ev.session_id)

    def handle_batch(self, events: Sequence[SessionEvent], now: float) -> Decisions:
        """Validate a whole batch, then apply it; a bad event rejects the batch."""
        self.check_events(events)
        directives: list[RetentionDirective] = []
        for ev in events:
            directives.extend(self._apply(ev, now).directives)
        return Decisions(directives=tuple(directives)) if directives else NO_DECISIONS

    def handle(self, event: SessionEvent, now: float) -> Decisions:
        """Validate and apply one session event."""
        return self.handle_batch((event,), now)

    def _apply(self, ev: SessionEvent, now: float) -> Decisions:
        self._events_total += 1
        self._tenant_counters.setdefault(ev.tenant_id, _TenantCounters()).events += 1
        s = self._sessions.get(ev.session_id)
        if s is None:
            if ev.kind is EventKind.SESSION_ABORT:
                return NO_DECISIONS
            s = _Session(ev.session_id, ev.tenant_id, ev.agent_type)
            self._sessions[ev.session_id] = s
        s.events += 1
        s.step_index = max(s.step_index, ev.step_index)
        s.context_tokens = ev.context_tokens
        s.last_event_s = now
        if ev.worker_id and ev.worker_id != s.home:
            self._move_home(s, ev.worker_id)
        kind = ev.kind
        if kind is EventKind.STEP_START:
            s.state = SessionState.RUNNING
            s.tier = Tier.GPU if s.home is not None else Tier.NONE
            s.lease_expires_s = 0.0
        elif kind is EventKind.TOOL_CALL_WAIT:
            s.state = SessionState.TOOL_WAIT
            if s.home is not None:
                ttl = self.config.default_lease_ttl_s
                s.lease_expires_s = now + ttl
                return self._directive(s, Action.RETAIN_GPU, ttl, "tool_wait")
        elif kind in (EventKind.TOOL_CALL_END, EventKind.STEP_END):
            s.state = SessionState.IDLE if kind is EventKind.STEP_END else SessionState.RUNNING
        elif kind in _DONE_KINDS:
            return self._finish(s, kind)
        return NO_DECISIONS

    def _finish(self, s: _Session, kind: EventKind) -> Decisions:
        decisions = NO_DECISIONS
        if s.home is not None and s.tier is not Tier.NONE:
            decisions = self._directive(s, Action.RELEASE, 0.0, kind.name.lower())
        if kind is EventKind.SESSION_FINISH:
            self._tenant_counters.setdefault(s.tenant_id, _TenantCounters()).completed_sessions += 1
        self._drop_session(s)
        return decisions

    # -- KV events and inventories ---------------------------------------------

    def kv_events(self, worker_id: WorkerId, events: Iterable[KvEvent], now: float) -> Decisions:
        """Track block counts from a worker's KV events."""
        w = self._require_worker(worker_id, "kv_events")
        for ev in events:
            n = len(ev.block_hashes)
            if ev.tier is not Tier.GPU and ev.kind is not KvEventKind.ALL_CLEARED:
                continue
            if ev.kind is KvEventKind.STORED:
                w.gpu_used_blocks += n
            elif ev.kind is KvEventKind.REMOVED:
                w.gpu_used_blocks = max(0, w.gpu_used_blocks - n)
            else:
                w.gpu_used_blocks = 0
                self._forget_residency(w)
        return NO_DECISIONS

    def reconcile(self, worker_id: WorkerId, inv: PoolInventory, now: float) -> Decisions:
        """Adopt a worker's inventory as the truth about residency."""
        w = self._require_worker(worker_id, "pool_snapshot")
        w.gpu_used_blocks = inv.gpu_used_blocks
        held = {r.session_id: r for r in inv.sessions}
        if inv.complete:
            for sid in list(w.sessions):
                if sid not in held:
                    self._sessions[sid].tier = Tier.NONE
        for r in inv.sessions:
            s = self._sessions.get(r.session_id)
            if s is None:
                s = _Session(r.session_id, r.tenant_id, agent_type="")
                self._sessions[r.session_id] = s
            self._move_home(s, worker_id)
            s.tier = Tier.GPU if r.gpu_blocks else (Tier.HOST if r.host_blocks else Tier.NONE)
            s.lease_expires_s = now + r.lease_remaining_s if r.lease_remaining_s > 0 else 0.0
        return NO_DECISIONS

    def directive_acked(
        self,
        worker_id: WorkerId,
        directive_id: DirectiveId,
        outcome: DirectiveOutcome,
        reason: str,
        now: float,
    ) -> None:
        """Record a worker's answer to a directive."""
        self._require_worker(worker_id, "directive_ack")

    def tick(self, now: float) -> Decisions:
        """Expire leases whose TTL passed."""
        out: list[RetentionDirective] = []
        for s in self._sessions.values():
            if s.lease_expires_s and s.lease_expires_s <= now:
                s.lease_expires_s = 0.0
                out.extend(self._directive(s, Action.RELEASE, 0.0, "lease_expired").directives)
        return Decisions(directives=tuple(out)) if out else NO_DECISIONS

    # -- placement ---------------------------------------------------------------

    def place(self, req: PlaceRequest, now: float) -> Placement:
        """Rank workers for a session's next step; empty when none is live."""
        self._placements_total += 1
        pool = [
            w
            for wid in (req.candidate_worker_ids or tuple(self._workers))
            if (w := self._workers.get(wid)) is not None and w.connected and not w.draining
        ]
        if not pool:
            return Placement(candidates=(), reason="no_live_worker")
        s = self._sessions.get(req.session_id)
        home = s.home if s is not None and s.tier is not Tier.NONE else None
        k = max(1, min(req.max_candidates or 3, self.config.max_candidates))

        def free_frac(w: _Worker) -> float:
            cap = max(1, w.spec.cache.gpu_capacity_blocks)
            return 1.0 - w.gpu_used_blocks / cap

        ranked = sorted(pool, key=lambda w: (-free_frac(w), w.spec.worker_id))
        reason = "least_loaded"
        if home is not None and any(w.spec.worker_id == home for w in pool):
            ranked.sort(key=lambda w: w.spec.worker_id != home)
            reason = "affinity"
        cands = []
        for w in ranked[:k]:
            cached = s.context_tokens if s is not None and w.spec.worker_id == home else 0
            tier = s.tier if s is not None and w.spec.worker_id == home else Tier.NONE
            score = cached / w.spec.cache.prefill_tokens_per_s + free_frac(w)
            cands.append(Candidate(w.spec.worker_id, w.spec.endpoint, cached, score, tier))
        return Placement(
            candidates=tuple(cands), affinity_ttl_s=self.config.affinity_ttl_s, reason=reason
        )

    # -- tenants -------------------------------------------------------------------

    def create_tenant(self, spec: TenantSpec) -> TenantSpec:
        """Add a tenant; raises KeyError-like FileExistsError when it exists."""
        if spec.tenant_id in self._tenants:
            raise FileExistsError(spec.tenant_id)
        self._tenants[spec.tenant_id] = spec
        return spec

    def update_tenant(self, spec: TenantSpec, fields: Iterable[str] | None = None) -> TenantSpec:
        """Update a tenant's fields (all mutable fields when ``fields`` is None)."""
        cur = self._tenants.get(spec.tenant_id)
        if cur is None:
            raise KeyError(spec.tenant_id)
        if fields is None:
            new = spec
        else:
            new = replace(cur, **{f: getattr(spec, f) for f in fields})
        self._tenants[spec.tenant_id] = new
        return new

    def get_tenant(self, tenant_id: TenantId) -> TenantSpec | None:
        """The tenant, or None."""
        return self._tenants.get(tenant_id)

    def list_tenants(self) -> list[TenantSpec]:
        """All tenants ordered by id."""
        return [self._tenants[t] for t in sorted(self._tenants)]

    def delete_tenant(self, tenant_id: TenantId) -> bool:
        """Remove a tenant; True when it existed."""
        return self._tenants.pop(tenant_id, None) is not None

    # -- read side -------------------------------------------------------------

    def session_view(self, session_id: SessionId, now: float) -> SessionView | None:
        """A session as operators see it, or None when unknown."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        return SessionView(
            session_id=s.session_id,
            tenant_id=s.tenant_id,
            agent_type=s.agent_type,
            home_worker_id=s.home,
            tier=s.tier,
            state=s.state,
            step_index=s.step_index,
            context_tokens=s.context_tokens,
            idle_s=max(0.0, now - s.last_event_s),
            lease_remaining_s=max(0.0, s.lease_expires_s - now) if s.lease_expires_s else 0.0,
            events=s.events,
        )

    def worker_views(self) -> list[WorkerView]:
        """Every known worker ordered by id."""
        return [self._worker_view(self._workers[w]) for w in sorted(self._workers)]

    def stats(self, now: float) -> ClusterStatsView:
        """Cluster-wide figures."""
        by_state = {st: 0 for st in SessionState}
        per_tenant: dict[TenantId, int] = {}
        for s in self._sessions.values():
            by_state[s.state] += 1
            per_tenant[s.tenant_id] = per_tenant.get(s.tenant_id, 0) + 1
        tenants = sorted(set(per_tenant) | set(self._tenant_counters))
        return ClusterStatsView(
            workers=len(self._workers),
            workers_connected=sum(w.connected for w in self._workers.values()),
            sessions_running=by_state[SessionState.RUNNING],
            sessions_tool_wait=by_state[SessionState.TOOL_WAIT],
            sessions_idle=by_state[SessionState.IDLE],
            events_total=self._events_total,
            placements_total=self._placements_total,
            directives_total=self._directives_total,
            gpu_used_blocks=sum(w.gpu_used_blocks for w in self._workers.values()),
            gpu_capacity_blocks=sum(
                w.spec.cache.gpu_capacity_blocks for w in self._workers.values()
            ),
            tenants=tuple(
                TenantStatsView(
                    tenant_id=t,
                    sessions=per_tenant.get(t, 0),
                    completed_sessions=self._tenant_counters.get(t, _TenantCounters()).completed_sessions,
                    events=self._tenant_counters.get(t, _TenantCounters()).events,
                    mean_slowdown=0.0,
                )
                for t in tenants
            ),
            leader_epoch=self.leader_epoch,
        )

    # -- internals -------------------------------------------------------------

    def _require_worker(self, worker_id: WorkerId, what: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise Rejected("worker_id", f"{what} from unknown worker {worker_id!r}")
        return w

    def _move_home(self, s: _Session, worker_id: WorkerId) -> None:
        if s.home is not None and (old := self._workers.get(s.home)) is not None:
            old.sessions.discard(s.session_id)
        s.home = worker_id
        self._workers[worker_id].sessions.add(s.session_id)

    def _drop_session(self, s: _Session) -> None:
        if s.home is not None and (w := self._workers.get(s.home)) is not None:
            w.sessions.discard(s.session_id)
        del self._sessions[s.session_id]

    def _forget_residency(self, w: _Worker) -> None:
        for sid in w.sessions:
            s = self._sessions.get(sid)
            if s is not None:
                s.tier = Tier.NONE
                s.lease_expires_s = 0.0

    def _directive(self, s: _Session, action: Action, ttl: float, reason: str) -> Decisions:
        assert s.home is not None
        self._directives_total += 1
        d = RetentionDirective(
            directive_id=DirectiveId(f"d{self.leader_epoch}-{next(self._directive_seq)}"),
            worker_id=s.home,
            session_id=s.session_id,
            action=action,
            lease_ttl_s=ttl,
            leader_epoch=self.leader_epoch,
            reason=reason,
        )
        return Decisions(directives=(d,))

    def _worker_view(self, w: _Worker) -> WorkerView:
        load = w.load
        return WorkerView(
            spec=w.spec,
            connected=w.connected,
            draining=w.draining,
            gpu_used_blocks=w.gpu_used_blocks,
            sessions=len(w.sessions),
            running_steps=load.running_steps if load else 0,
            queued_prefill_tokens=load.queued_prefill_tokens if load else 0,
        )
