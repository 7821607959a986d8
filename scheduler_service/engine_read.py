"""The engine's read side: session, worker and cluster views for operators."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scheduler_service.domain import (
    ClusterStatsView,
    SessionId,
    SessionState,
    SessionView,
    TenantStatsView,
    Tier,
    WorkerId,
    WorkerView,
)
from scheduler_service.state import (
    NO_SLOT,
    STATE_IDLE,
    STATE_RUNNING,
    STATE_TOOL_WAIT,
    ClusterState,
)

if TYPE_CHECKING:
    from scheduler_service.engine import Engine


def session_view(engine: Engine, s: int, now: float) -> SessionView:
    """One session as operators see it."""
    ss, ws = engine.state.sessions, engine.state.workers
    home = int(ss.home_v[s])
    lease = float(ss.lease_expires_s_v[s])
    return SessionView(
        session_id=SessionId(ss.ids[s] or ""),
        tenant_id=engine.fair.tenants.names[int(ss.tenant_v[s])],
        agent_type=engine.agents.names[int(ss.agent_v[s])],
        home_worker_id=WorkerId(ws.ids[home] or "") if home != NO_SLOT else None,
        tier=Tier(int(ss.tier_v[s])),
        state=SessionState(int(ss.state_v[s])),
        step_index=int(ss.step_index_v[s]),
        context_tokens=int(ss.context_tokens_v[s]),
        idle_s=max(0.0, now - float(ss.last_event_s_v[s])),
        lease_remaining_s=max(0.0, lease - now) if lease else 0.0,
        events=int(ss.events_v[s]),
    )


def worker_view(state: ClusterState, w: int) -> WorkerView:
    """One worker as operators see it."""
    ws = state.workers
    return WorkerView(
        spec=ws.spec(w),
        connected=bool(ws.connected_v[w]),
        draining=bool(ws.draining_v[w]),
        gpu_used_blocks=int(ws.gpu_used_blocks_v[w]),
        sessions=int(ws.residents_v[w]),
        running_steps=int(ws.running_steps_v[w]),
        queued_prefill_tokens=int(ws.queued_prefill_tokens_v[w]),
    )


def cluster_stats(engine: Engine, now: float) -> ClusterStatsView:
    """Cluster-wide figures (one pass over the arrays, no per-session Python)."""
    ss, ws = engine.state.sessions, engine.state.workers
    hw = ss.high_water
    in_use = ss.tenant[:hw] != NO_SLOT
    states = np.bincount(ss.state[:hw][in_use].astype(np.int64), minlength=5)
    fair = engine.fair
    per_tenant = np.bincount(
        ss.tenant[:hw][in_use].astype(np.int64), minlength=len(fair.tenants.names)
    )
    order = sorted(range(len(fair.tenants.names)), key=lambda t: fair.tenants.names[t])
    gpu_bytes, host_bytes = engine.state.tenant_gpu_bytes, engine.state.tenant_host_bytes
    nw = ws.high_water
    return ClusterStatsView(
        workers=len(ws),
        workers_connected=int(ws.connected[:nw].sum()),
        sessions_running=int(states[STATE_RUNNING]),
        sessions_tool_wait=int(states[STATE_TOOL_WAIT]),
        sessions_idle=int(states[STATE_IDLE]),
        events_total=engine.events_total,
        placements_total=engine.placements_total,
        directives_total=engine.directives_total,
        gpu_used_blocks=int(ws.gpu_used_blocks[:nw].sum()),
        gpu_capacity_blocks=int(ws.gpu_cap_blocks[:nw].sum()),
        tenants=tuple(
            TenantStatsView(
                tenant_id=fair.tenants.names[t],
                sessions=int(per_tenant[t]),
                completed_sessions=fair.completed[t],
                events=fair.events[t],
                mean_slowdown=fair.mean_slowdown(t),
                kv_gpu_bytes=gpu_bytes[t] if t < len(gpu_bytes) else 0,
                kv_host_bytes=host_bytes[t] if t < len(host_bytes) else 0,
            )
            for t in order
        ),
        leader_epoch=engine.leader_epoch,
    )
