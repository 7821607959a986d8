"""Random valid traffic keeps the engine's invariants and its contract."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.domain import (
    Action,
    CacheSpec,
    EventId,
    EventKind,
    SessionEvent,
    SessionId,
    TenantId,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine, EngineConfig
from scheduler_service.state import NO_SLOT, TIER_GPU, TIER_HOST, TIER_NONE
from tests.engine.agent_loop import NEXT

K = EventKind
WORKERS = [WorkerId(f"w{i}") for i in range(3)]

ops = st.lists(
    st.tuples(
        st.sampled_from(["event", "event", "event", "heartbeat", "tick"]),
        st.integers(0, 7),  # session
        st.integers(0, 2),  # worker
        st.integers(0, 6),  # choice
        st.floats(0.0, 30.0),  # time step
    ),
    min_size=1,
    max_size=80,
)


def _check_invariants(e: Engine) -> None:
    ss, ws = e.state.sessions, e.state.workers
    live = [s for s in range(ss.high_water) if ss.ids[s] is not None]
    for s in live:
        tier = int(ss.tier[s])
        assert tier in (TIER_NONE, TIER_GPU, TIER_HOST)
        assert ss.gpu_blocks[s] >= 0 and ss.host_blocks[s] >= 0
        if tier == TIER_HOST:
            assert ss.gpu_blocks[s] == 0
        if ss.lease_expires_s[s]:
            assert tier == TIER_GPU
        if ss.home[s] != NO_SLOT:
            assert s in e.state.residents_of(int(ss.home[s]))
    for w in range(ws.high_water):
        members = e.state.residents_of(w)
        assert len(members) == ws.residents[w] == len(set(members))
        assert all(ss.home[s] == w for s in members)
        assert ws.gpu_used_blocks[w] >= 0 and ws.host_used_blocks[w] >= 0


@settings(max_examples=120, deadline=None)
@given(ops)
def test_random_traffic_keeps_invariants_and_the_directive_contract(script: list) -> None:
    e = Engine(EngineConfig(high_watermark=0.3))
    for i, wid in enumerate(WORKERS):
        cache = CacheSpec(16, 131_072, 400 + 300 * i, 300 * i, prefill_tokens_per_s=20_000.0)
        e.register_worker(WorkerSpec(wid, 1, cache), 0.0)
    last: dict[str, EventKind | None] = {}
    ctx: dict[str, int] = {}
    now = 0.0
    seq = 0
    for op, sess, w, choice, dt in script:
        now += dt
        if op == "heartbeat":
            cap = e.state.workers.gpu_cap_blocks[w]
            ds = e.heartbeat(WORKERS[w], WorkerLoad(int(cap * choice / 6), 0, 1_000 * choice), now)
        elif op == "tick":
            ds = e.tick(now)
        else:
            sid = f"s{sess}"
            kinds = NEXT[last.get(sid)]
            kind = kinds[choice % len(kinds)]
            ctx[sid] = ctx.get(sid, 0) + 400 * choice
            ev = SessionEvent(
                EventId(f"e{seq}"),
                SessionId(sid),
                TenantId(f"t{sess % 2}"),
                "coder",
                0,
                kind,
                ctx[sid],
                tool_name=f"tool{choice % 3}",
                expected_tool_latency_s=float(choice),
                worker_id=WORKERS[w],
                last_step=choice == 6,
            )
            ds = e.handle(ev, now)
            last[sid] = None if kind in (K.SESSION_FINISH, K.SESSION_ABORT) else kind
            if last[sid] is None:
                ctx.pop(sid)
        for d in ds.directives:
            seq += 1
            assert d.directive_id == f"d1-{seq}"  # dense, ordered, deterministic
            assert d.leader_epoch == 1 and d.worker_id in WORKERS
            if d.action is Action.RETAIN_GPU:
                assert d.lease_ttl_s > 0  # a lease, never a pin
        _check_invariants(e)
    stats = e.stats(now)
    assert stats.sessions_running + stats.sessions_tool_wait + stats.sessions_idle == len(
        e.state.sessions
    )
    assert np.all(e.state.sessions.tier[: e.state.sessions.high_water] >= 0)
