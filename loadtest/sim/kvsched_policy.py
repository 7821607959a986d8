"""The ``kvsched`` policy: the simulated fleet drives the real decision engine.

Each replica registers as a worker with the cache spec the cost model gives
it; session events go to ``Engine.handle_batch`` as a worker would stream
them, steps are placed with ``Engine.place``, heartbeats carry each pool's
load, and ``Engine.tick`` runs on a timer. The engine's directives are applied
to the simulated pools the way the reference block pool applies them:
RETAIN_GPU leases the blocks until the TTL, OFFLOAD_HOST copies them to the
host tier, PREFETCH_GPU reloads them (ready after the link time) under a
lease, RELEASE ends a lease and puts the blocks first in line for eviction,
EVICT_NOW frees them. Each step queues on its replica at the fair-share
priority Place gave it. Under admission pressure the replica still evicts LRU
on its own, as a worker whose scheduler is slow would.
"""

from __future__ import annotations

from dataclasses import replace

from loadtest.sim.cluster import Pool
from loadtest.sim.policies import VllmApc
from scheduler_service.domain import (
    Action,
    CacheSpec,
    Decisions,
    EventId,
    EventKind,
    PlaceRequest,
    SessionEvent,
    SessionId,
    TenantId,
    TenantSpec,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine


class KvschedPolicy(VllmApc):
    """Placement and retention by ``scheduler_service.engine.Engine``."""

    name = "kvsched"
    tick_s = 0.25  # engine timers (lease expiry, prefetch) fire at this resolution
    # NOTE: how fresh the engine's load figures are. Place counts what it sent
    # each worker since that worker's last heartbeat, so 1 s heartbeats do as
    # well as these on the standard scenario (docs/simulator.md).
    heartbeat_s = 0.25
    send_hints = False  # agents do not declare tool latency unless a scenario says so
    tenant_weights: dict[str, float] = {}  # noqa: RUF012 (replaced per instance, never mutated)

    def attach(self, sim: object) -> None:
        """Create the engine and register one worker per replica."""
        super().attach(sim)
        m = sim.model  # type: ignore[attr-defined]
        self.engine = Engine()
        self.wids = [WorkerId(f"r{i}") for i in range(self.n)]
        self.slot = {w: i for i, w in enumerate(self.wids)}
        self.pull: dict[int, int] = {}  # session -> replica its placed step loads KV from
        c = sim.cluster  # type: ignore[attr-defined]
        per_domain = c.kv_transfer_gpus // c.tensor_parallel if c.kv_transfer_gpus else 0
        spec = CacheSpec(
            block_size_tokens=m.block_size_tokens,
            bytes_per_token=m.bytes_per_token,
            gpu_capacity_blocks=m.capacity_blocks,
            host_capacity_blocks=m.host_capacity_blocks,
            prefill_tokens_per_s=m.prefill_tokens_per_s,
            host_link_bytes_per_s=m.host_link_bytes_per_s,
            decode_tokens_per_s=1.0 / m.token_time_s(0.0),
            hbm_bytes_per_s=m.hbm_bytes_per_s,
        )
        for i, w in enumerate(self.wids):
            domain = f"node{i // per_domain}" if per_domain else ""
            self.engine.register_worker(
                WorkerSpec(w, 1, replace(spec, kv_transfer_domain=domain)), 0.0
            )
        # tenants with their weights, as an operator would create them (fair share)
        for t, weight in sorted(self.tenant_weights.items()):
            self.engine.create_tenant(TenantSpec(TenantId(t), weight=weight))
        self.ev = 0
        self.last_heartbeat_s = -1e9
        self.directives = 0
        self.priority: dict[int, int] = {}

    def step_priority(self, sid: int) -> int:
        """The fair-share priority the engine gave the step's placement."""
        return self.priority.get(sid, 0)

    def _event(
        self,
        sid: int,
        step: int,
        kind: EventKind,
        ctx: int,
        new: int,
        r: int,
        tool: str = "",
        hint_s: float = 0.0,
        last: bool = False,
    ) -> SessionEvent:
        s = self.sessions[sid]
        self.ev += 1
        return SessionEvent(
            EventId(f"e{self.ev}"),
            SessionId(s.session_id),
            TenantId(s.tenant_id),
            s.agent_type,
            step,
            kind,
            ctx,
            new,
            tool,
            hint_s,
            "",
            last,
            0.0,
            self.wids[r],
        )

    def _send(self, events: list[SessionEvent], now: float) -> None:
        self.apply(self.engine.handle_batch(events, now), now)

    def apply(self, d: Decisions, now: float) -> None:
        """Enforce the engine's directives on the simulated pools."""
        sim = self.sim
        idx = self.sim.index  # type: ignore[attr-defined]
        m = sim.model  # type: ignore[attr-defined]
        for di in d.directives:
            self.directives += 1
            r = self.slot[di.worker_id]
            sid = idx[di.session_id]
            pool: Pool = sim.replicas[r].pool  # type: ignore[attr-defined]
            a = di.action
            if a is Action.RETAIN_GPU:
                if sid in pool.lru or sid in pool.lease_until:
                    sim.lease(r, sid, di.lease_ttl_s)  # type: ignore[attr-defined]
            elif a is Action.OFFLOAD_HOST:
                if sid in pool.lru or sid in pool.lease_until:
                    pool.offload(sid)
            elif a is Action.PREFETCH_GPU:
                tokens = pool.host.get(sid, 0) * m.block_size_tokens
                if tokens and pool.reload(sid, now, m.reload_s(tokens)):
                    sim.lease(r, sid, di.lease_ttl_s)  # type: ignore[attr-defined]
            elif a is Action.RELEASE:
                if sid in pool.lru or sid in pool.lease_until:
                    pool.idle(sid, first=True)
                    sim.try_admit(r)  # type: ignore[attr-defined]
                pool.drop_host(sid)
            elif a is Action.EVICT_NOW:
                if sid in pool.lru or sid in pool.lease_until:
                    pool.drop(sid)
                    sim.try_admit(r)  # type: ignore[attr-defined]
                pool.drop_host(sid)

    def place(self, sid: int, step: int, now: float) -> int:
        """The engine's first candidate (the hash home if it offers none)."""
        s = self.sessions[sid]
        p = self.engine.place(
            PlaceRequest(
                SessionId(s.session_id),
                TenantId(s.tenant_id),
                s.agent_type,
                step,
                s.context_before_step(step),
                s.output_tokens[step],
                max_candidates=1,
            ),
            now,
        )
        self.priority[sid] = p.step_priority
        if not p.candidates:
            self.pull.pop(sid, None)
            return self.home(sid)
        first = p.candidates[0]
        if first.kv_source_worker_id:
            self.pull[sid] = self.slot[first.kv_source_worker_id]
        else:
            self.pull.pop(sid, None)
        return self.slot[first.worker_id]

    def kv_source(self, sid: int) -> int:
        """Where Place said the step's KV is, when it is on another replica of its domain."""
        return self.pull.get(sid, -1)

    def on_admit(self, sid: int, step: int, r: int, now: float) -> None:
        """STEP_START from the replica the step runs on."""
        s = self.sessions[sid]
        self._send(
            [
                self._event(
                    sid,
                    step,
                    EventKind.STEP_START,
                    s.context_before_step(step),
                    s.output_tokens[step],
                    r,
                )
            ],
            now,
        )

    def on_step_end(self, sid: int, step: int, r: int, now: float) -> None:
        """TOOL_CALL_WAIT with the context the wait holds."""
        s = self.sessions[sid]
        ctx = s.context_before_step(step) + s.output_tokens[step]
        hint = s.tool_latency_s[step] if self.send_hints else 0.0
        self._send(
            [
                self._event(
                    sid,
                    step,
                    EventKind.TOOL_CALL_WAIT,
                    ctx,
                    0,
                    r,
                    s.tool_names[step] or "join",
                    hint,
                )
            ],
            now,
        )

    def on_tool_end(self, sid: int, step: int, now: float) -> None:
        """TOOL_CALL_END (the reload of an offloaded session starts here)."""
        s = self.sessions[sid]
        ctx = s.context_before_step(step) + s.output_tokens[step]
        r = self.sim.where[sid]  # type: ignore[attr-defined]
        self._send(
            [
                self._event(
                    sid, step, EventKind.TOOL_CALL_END, ctx, 0, r, s.tool_names[step] or "join"
                )
            ],
            now,
        )

    def on_finish(self, sid: int, r: int, now: float) -> None:
        """STEP_END then SESSION_FINISH."""
        s = self.sessions[sid]
        i = s.steps - 1
        ctx = s.context_before_step(i) + s.output_tokens[i]
        self._send(
            [
                self._event(sid, i, EventKind.STEP_END, ctx, 0, r, last=True),
                self._event(sid, i, EventKind.SESSION_FINISH, ctx, 0, r),
            ],
            now,
        )

    def on_tick(self, now: float) -> None:
        """Heartbeats (every ``heartbeat_s``) and the engine's timers."""
        if now - self.last_heartbeat_s >= self.heartbeat_s:
            self.last_heartbeat_s = now
            for i, rep in enumerate(self.sim.replicas):  # type: ignore[attr-defined]
                pool = rep.pool
                # NOTE: finished sessions' cached blocks count as free: no one
                # will use them and the replica evicts them first in effect.
                load = WorkerLoad(
                    pool.cap - pool.used + pool.dead_blocks,
                    pool.host_cap - pool.host_used,
                    self.sim.queued_prefill_tokens(i),  # type: ignore[attr-defined]
                    rep.running,
                )
                self.apply(self.engine.heartbeat(self.wids[i], load, now), now)
        self.apply(self.engine.tick(now), now)
