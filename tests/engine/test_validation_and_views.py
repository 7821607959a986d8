"""Bad events are rejected with nothing changed; workers, views and stats stay exact."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_service.domain import (
    EventId,
    EventKind,
    KvEvent,
    KvEventKind,
    PoolInventory,
    Rejected,
    SessionEvent,
    SessionId,
    SessionResidency,
    SessionState,
    StaleEpoch,
    TenantId,
    TenantSpec,
    Tier,
    WorkerId,
)

K = EventKind


def _ev(sid: str, kind: EventKind, ctx: int = 1_000, **kw: Any) -> SessionEvent:
    fields: dict[str, Any] = {
        "event_id": EventId("e"),
        "session_id": SessionId(sid),
        "tenant_id": TenantId("t1"),
        "agent_type": "coder",
        "step_index": 0,
        "kind": kind,
        "context_tokens": ctx,
        "worker_id": WorkerId("w1"),
    }
    fields.update(kw)
    return SessionEvent(**fields)


def _snapshot(engine: Any) -> tuple[Any, ...]:
    st = engine.state
    arrays = tuple(
        getattr(t, name).copy() for t in (st.sessions, st.workers) for name, _d, _f in t._fields
    )
    graphs = tuple(g.duration.copy() for g in engine.graphs.graphs.values())
    return (
        arrays,
        graphs,
        dict(st.sessions.slot_of),
        engine.events_total,
        engine.directives_total,
        engine._directive_seq,
        list(engine.fair.events),
    )


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    arrays_a, graphs_a, *rest_a = a
    arrays_b, graphs_b, *rest_b = b
    return (
        all(np.array_equal(x, y) for x, y in zip(arrays_a, arrays_b, strict=True))
        and len(graphs_a) == len(graphs_b)
        and all(np.array_equal(x, y) for x, y in zip(graphs_a, graphs_b, strict=True))
        and rest_a == rest_b
    )


@pytest.mark.parametrize(
    ("batch", "field"),
    [
        ([_ev("ghost", K.TOOL_CALL_END)], "events[0].session_id"),
        ([_ev("s1", K.STEP_START), _ev("s9", K.STEP_START, ctx=-1)], "events[1].context_tokens"),
        ([_ev("s9", K.STEP_START, new_tokens=-5)], "events[0].new_tokens"),
        ([_ev("s9", K.STEP_START, step_index=-1)], "events[0].step_index"),
        (
            [_ev("s1", K.TOOL_CALL_WAIT, expected_tool_latency_s=math.nan)],
            "events[0].expected_tool_latency_s",
        ),
        (
            [_ev("s1", K.TOOL_CALL_WAIT, expected_tool_latency_s=-1.0)],
            "events[0].expected_tool_latency_s",
        ),
        ([_ev("s1", K.STEP_END, tenant_id=TenantId("t2"))], "events[0].tenant_id"),
        ([_ev("s9", K.STEP_START, worker_id=WorkerId("nope"))], "events[0].worker_id"),
        # a session ended earlier in the same batch is unknown again
        ([_ev("s1", K.SESSION_FINISH), _ev("s1", K.TOOL_CALL_WAIT)], "events[1].session_id"),
    ],
)
def test_bad_batches_are_rejected_without_changing_state(
    script: Any, batch: list[SessionEvent], field: str
) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 1_000)
    sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 1_000, tool_name="bash")
    before = _snapshot(sc.engine)
    with pytest.raises(Rejected) as exc:
        sc.engine.handle_batch(batch, 3.0)
    assert exc.value.field == field
    assert _same(before, _snapshot(sc.engine))
    with pytest.raises(Rejected):
        sc.engine.check_events(batch)
    assert _same(before, _snapshot(sc.engine))
    # the engine goes on where it was: the next directive id is the next in sequence
    [d] = sc.event(4.0, "s1", K.SESSION_FINISH, 1_000)
    assert d.directive_id == "d1-2"


def test_a_batch_may_create_and_use_a_session(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    out = sc.engine.handle_batch(
        [
            _ev("n1", K.STEP_START),
            _ev("n1", K.TOOL_CALL_WAIT, tool_name="x"),
            _ev("n1", K.SESSION_FINISH),
        ],
        1.0,
    )
    assert [d.action.name for d in out.directives] == ["RETAIN_GPU", "RELEASE"]


def test_worker_epochs(script: Any) -> None:
    sc = script()
    sc.worker("w1", epoch=2)
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    with pytest.raises(StaleEpoch):
        sc.worker("w1", epoch=1)
    assert sc.engine.worker_epoch(WorkerId("w1")) == 2
    assert sc.engine.worker_epoch(WorkerId("zz")) is None
    # same epoch again (a reconnect): the KV is still there
    sc.worker("w1", epoch=2)
    assert sc.engine.session_view(SessionId("s1"), 1.0).tier is Tier.GPU
    # a new epoch holds nothing
    sc.worker("w1", epoch=3)
    view = sc.engine.session_view(SessionId("s1"), 1.0)
    assert (view.tier, view.home_worker_id) == (Tier.NONE, "w1")
    assert sc.engine.worker_views()[0].gpu_used_blocks == 0


def test_drain_and_disconnect_leave_placement(script: Any) -> None:
    from scheduler_service.domain import PlaceRequest

    sc = script()
    sc.worker("w1")
    sc.worker("w2")
    req = PlaceRequest(SessionId("x"), TenantId("t1"), "coder", 0, 1_000)
    assert {c.worker_id for c in sc.engine.place(req, 0.0).candidates} == {"w1", "w2"}
    view = sc.engine.drain_worker(WorkerId("w1"), 0.0)
    assert view.draining
    assert [c.worker_id for c in sc.engine.place(req, 0.0).candidates] == ["w2"]
    sc.engine.worker_disconnected(WorkerId("w2"), 0.0)
    p = sc.engine.place(req, 0.0)
    assert (p.candidates, p.reason) == ((), "no_live_worker")
    with pytest.raises(KeyError):
        sc.engine.drain_worker(WorkerId("nope"), 0.0)


def test_kv_events_move_usage_and_expected_removals_are_not_counted_twice(script: Any) -> None:
    sc = script(high_watermark=0.2)
    sc.worker("w1", gpu_blocks=100)
    e, w1 = sc.engine, WorkerId("w1")
    e.kv_events(w1, [KvEvent(KvEventKind.STORED, tuple(range(40)))], 0.0)
    assert e.worker_views()[0].gpu_used_blocks == 40
    # the session's own growth is reported by the KV feed, not booked again
    sc.event(1.0, "s1", K.STEP_START, 640)  # 40 blocks
    assert e.worker_views()[0].gpu_used_blocks == 40
    sc.event(2.0, "s1", K.SESSION_FINISH, 640)  # RELEASE books 40 blocks freed at once
    assert e.worker_views()[0].gpu_used_blocks == 0
    e.kv_events(w1, [KvEvent(KvEventKind.REMOVED, tuple(range(40)))], 3.0)
    assert e.worker_views()[0].gpu_used_blocks == 0
    e.kv_events(w1, [KvEvent(KvEventKind.STORED, tuple(range(30)))], 3.0)
    e.kv_events(w1, [KvEvent(KvEventKind.REMOVED, tuple(range(10)))], 3.0)
    assert e.worker_views()[0].gpu_used_blocks == 20
    e.kv_events(w1, [KvEvent(KvEventKind.ALL_CLEARED)], 4.0)
    assert e.worker_views()[0].gpu_used_blocks == 0
    with pytest.raises(Rejected):
        e.kv_events(WorkerId("nope"), [], 0.0)


def test_reconcile_adopts_the_inventory(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 1_600)
    sc.event(1.0, "s2", K.STEP_START, 1_600)
    inv = PoolInventory(
        gpu_used_blocks=350,
        host_used_blocks=50,
        sessions=(
            SessionResidency(SessionId("s2"), TenantId("t1"), gpu_blocks=0, host_blocks=50),
            SessionResidency(
                SessionId("s3"), TenantId("t9"), gpu_blocks=250, lease_remaining_s=5.0
            ),
        ),
    )
    assert sc.engine.reconcile(WorkerId("w1"), inv, 10.0).directives == ()
    tiers = {s: sc.engine.session_view(SessionId(s), 10.0).tier for s in ("s1", "s2", "s3")}
    assert tiers == {"s1": Tier.NONE, "s2": Tier.HOST, "s3": Tier.GPU}
    assert sc.engine.session_view(SessionId("s3"), 10.0).lease_remaining_s == 5.0
    assert sc.engine.worker_views()[0].gpu_used_blocks == 350
    # the adopted lease runs out like any other
    assert [d.action.name for d in sc.tick(15.0)] == ["RELEASE"]


def test_stats_and_tenants(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    e = sc.engine
    e.create_tenant(TenantSpec(TenantId("t1"), weight=2.0))
    with pytest.raises(FileExistsError):
        e.create_tenant(TenantSpec(TenantId("t1")))
    assert (
        e.update_tenant(TenantSpec(TenantId("t1"), display_name="T"), ["display_name"]).weight
        == 2.0
    )
    sc.event(1.0, "a", K.STEP_START, 1_000)
    sc.event(1.0, "b", K.STEP_START, 1_000, tenant="t2")
    sc.event(2.0, "b", K.TOOL_CALL_WAIT, 1_000, tenant="t2", tool_name="x")
    sc.event(2.0, "c", K.STEP_START, 1_000)
    sc.event(3.0, "c", K.STEP_END, 1_000)
    sc.event(4.0, "a", K.SESSION_FINISH, 1_000)
    st = e.stats(5.0)
    assert (st.sessions_running, st.sessions_tool_wait, st.sessions_idle) == (0, 1, 1)
    assert (st.events_total, st.workers, st.workers_connected) == (6, 1, 1)
    assert [(t.tenant_id, t.sessions, t.completed_sessions, t.events) for t in st.tenants] == [
        ("t1", 1, 1, 4),
        ("t2", 1, 0, 2),
    ]
    assert st.tenants[0].mean_slowdown >= 1.0
    view = e.session_view(SessionId("b"), 5.0)
    assert (view.state, view.idle_s, view.events, view.agent_type) == (
        SessionState.TOOL_WAIT,
        3.0,
        2,
        "coder",
    )
    assert [t.tenant_id for t in e.list_tenants()] == ["t1"]
    assert e.delete_tenant(TenantId("t1")) and not e.delete_tenant(TenantId("t1"))


_BAD_FIELDS = st.sampled_from(
    [
        *[{}] * 10,  # mostly clean events: a bad one early hides the checks after it
        {"context_tokens": -1},
        {"new_tokens": -3},
        {"step_index": -1},
        {"expected_tool_latency_s": math.nan},
        {"expected_tool_latency_s": math.inf},
        {"expected_tool_latency_s": -0.5},
        {"worker_id": WorkerId("nope")},
        {"worker_id": WorkerId("")},
        {"tenant_id": TenantId("t2")},
        {"tenant_id": TenantId("t9")},
    ]
)
_BATCH_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["s1", "s2", "s3", "n1", "n2"]), st.sampled_from(list(K)), _BAD_FIELDS
    ),
    min_size=1,
    max_size=12,
)


# the fixture is a factory: each example calls it for a fresh engine
@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=_BATCH_EVENTS)
def test_the_batch_paths_vectorised_check_names_the_same_field(
    script: Any, rows: list[tuple[str, EventKind, dict[str, Any]]]
) -> None:
    # Batches the compiled path takes are checked column-wise (check_columns);
    # whatever the batch, it must accept what check_events accepts and reject
    # with the field check_events names, changing nothing either way.
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 1_000)
    sc.event(1.0, "s2", K.STEP_START, 1_000, tenant="t2")
    sc.event(1.0, "s3", K.STEP_START, 1_000)
    sc.event(2.0, "s3", K.SESSION_FINISH, 1_000)
    batch = [
        _ev(sid, kind, **({"tenant_id": TenantId("t2")} if sid == "s2" else {}) | bad)
        for sid, kind, bad in rows
    ]
    e = sc.engine
    want = None
    try:
        e.check_events(batch)
    except Rejected as r:
        want = (r.field, r.description)
    before = _snapshot(e)
    got = None
    try:
        e._batch.columns(batch, check=True)
    except Rejected as r:
        got = (r.field, r.description)
    assert got == want
    assert _same(before, _snapshot(e))
