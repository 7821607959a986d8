"""The compiled batch path makes exactly the per-event Python path's decisions.

``Engine.handle_batch`` applies batches with ``kernels.events.apply_events``
and hands the events the kernel does not cover back to the Python path; that
per-event path is the kernel's reference twin. Two engines take the same
traffic, one with the batch path switched off, and must agree on every
directive and every array after every call.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service import kernels
from scheduler_service.domain import (
    CacheSpec,
    EventId,
    EventKind,
    KvEvent,
    KvEventKind,
    SessionEvent,
    SessionId,
    TenantId,
    TenantSpec,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine, EngineConfig
from scheduler_service.graph import GraphPrior
from scheduler_service.kernels import events as kev
from scheduler_service.state import (
    NO_SLOT,
    NO_TIMER,
    STATE_RUNNING,
    STATE_TOOL_WAIT,
    TIER_GPU,
    TIER_HOST,
    TIER_NONE,
)
from tests.engine.agent_loop import NEXT

K = EventKind
WORKERS = [WorkerId(f"w{i}") for i in range(3)]
GRAPH_FIELDS = (
    "duration",
    "tokens",
    "trans",
    "tokens_sum",
    "tokens_weight",
    "continued",
    "finished",
)


def _engine(half_life_s: float, batch_path: bool) -> Engine:
    e = Engine(
        EngineConfig(
            high_watermark=0.3,
            graph_prior=GraphPrior(half_life_s=half_life_s),
            batch_path=batch_path,
        )
    )
    e._batch.min_batch = 1  # the kernel takes even one-event batches here
    for i, wid in enumerate(WORKERS):
        cache = CacheSpec(
            16,
            131_072,
            300 + 400 * i,
            2_000 * i,
            prefill_tokens_per_s=20_000.0,
            decode_tokens_per_s=50.0 if i == 1 else 0.0,  # declared on one, learned on two
        )
        e.register_worker(WorkerSpec(wid, 1, cache), 0.0)
    return e


def _assert_same(a: Engine, b: Engine) -> None:
    for table in ("sessions", "workers"):
        ta, tb = getattr(a.state, table), getattr(b.state, table)
        assert ta.slot_of == tb.slot_of
        for name, _dtype, _fill in ta._fields:
            x, y = getattr(ta, name), getattr(tb, name)
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{table}.{name}"
    assert a.state.tenant_gpu_bytes == b.state.tenant_gpu_bytes
    assert a.state.tenant_host_bytes == b.state.tenant_host_bytes
    assert a.fair.events == b.fair.events
    for name in ("slowdown", "completed", "correction", "integral", "live_slowdown", "priority"):
        assert getattr(a.fair, name) == getattr(b.fair, name), f"fair.{name}"
    assert np.array_equal(a.fair.protection, b.fair.protection)
    assert a.state.tenant_sessions == b.state.tenant_sessions
    assert a.state.sessions._free == b.state.sessions._free
    assert a.state.sessions.ids == b.state.sessions.ids
    assert a._unacked == b._unacked
    for slot, ga in a.graphs.graphs.items():
        gb = b.graphs.graphs[slot]
        assert ga.keys == gb.keys and ga._t_ref == gb._t_ref
        for name in GRAPH_FIELDS:
            assert np.array_equal(getattr(ga, name), getattr(gb, name)), f"graph {slot} {name}"


traffic = st.lists(
    st.tuples(
        st.sampled_from(["batch", "batch", "batch", "heartbeat", "tick", "kv"]),
        st.lists(
            st.tuples(
                st.integers(0, 9),  # session
                st.integers(0, 3),  # worker (3: none named)
                st.integers(0, 6),  # choice
            ),
            min_size=1,
            max_size=12,
        ),
        st.floats(0.0, 20.0),  # time step
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(traffic, st.sampled_from([3600.0, 0.5]))
def test_batches_agree_with_the_per_event_path(script: list[Any], half_life_s: float) -> None:
    # a 0.5 s half-life makes the graphs rescale their weights within the run
    a, b = _engine(half_life_s, True), _engine(half_life_s, False)
    last: dict[str, EventKind | None] = {}
    ctx: dict[str, int] = {}
    now = 0.0
    seq = 0
    for op, items, dt in script:
        now += dt
        if op == "heartbeat":
            w, _, choice = items[0]
            w %= len(WORKERS)
            cap = int(a.state.workers.gpu_cap_blocks[w])
            load = WorkerLoad(cap * choice // 6, 100, 2_000 * choice)
            calls = [e.heartbeat(WORKERS[w], load, now) for e in (a, b)]
        elif op == "tick":
            calls = [e.tick(now) for e in (a, b)]
        elif op == "kv":
            # a worker that publishes KV events books its own growth (kv_feed)
            w, _, choice = items[0]
            stored = KvEvent(KvEventKind.STORED, (choice, choice + 1), token_count=32)
            calls = [e.kv_events(WORKERS[w % len(WORKERS)], [stored], now) for e in (a, b)]
        else:
            batch = []
            for sess, w, choice in items:
                sid = f"s{sess}"
                kinds = NEXT[last.get(sid)]
                kind = kinds[choice % len(kinds)]
                ctx[sid] = max(0, ctx.get(sid, 0) + 300 * choice - 300)  # may shrink
                seq += 1
                batch.append(
                    SessionEvent(
                        EventId(f"e{seq}"),
                        SessionId(sid),
                        TenantId(f"t{sess % 2}"),
                        "coder" if sess % 3 else "browser",
                        choice,
                        kind,
                        ctx[sid],
                        new_tokens=100 * choice,
                        tool_name=f"tool{choice % 3}",
                        expected_tool_latency_s=float(choice % 4),
                        worker_id=WORKERS[w] if w < len(WORKERS) else WorkerId(""),
                        last_step=choice == 6,
                    )
                )
                last[sid] = None if kind in (K.SESSION_FINISH, K.SESSION_ABORT) else kind
                if last[sid] is None:
                    ctx.pop(sid)
            calls = [e.handle_batch(batch, now) for e in (a, b)]
        assert calls[0] == calls[1]
        _assert_same(a, b)


def test_the_kernel_applies_a_steady_mix_without_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Known sessions on their home, no pressure: no event goes through Python."""
    e = _engine(3600.0, True)
    start = [
        SessionEvent(EventId(f"a{i}"), SessionId(f"s{i}"), TenantId("t"), "coder", 0,
                     K.STEP_START, 1_000, worker_id=WORKERS[2])
        for i in range(4)
    ]  # fmt: skip
    e.handle_batch(start, 0.0)
    # every node the waits will use exists before the measured batch
    e.handle_batch([_ev(i, K.TOOL_CALL_WAIT, 1_200, tool_name="bash") for i in range(4)], 1.0)
    python_path: list[int] = []
    original = Engine._apply_events

    def counted(self: Engine, events: Any, now: float) -> None:
        python_path.append(len(events))
        original(self, events, now)

    monkeypatch.setattr(Engine, "_apply_events", counted)
    steady = [
        *(_ev(i, K.TOOL_CALL_END, 1_500) for i in range(4)),
        *(_ev(i, K.STEP_START, 1_500, new_tokens=200) for i in range(4)),
        *(_ev(i, K.TOOL_CALL_WAIT, 1_900, tool_name="bash", expected_tool_latency_s=2.0)
          for i in range(4)),
    ]  # fmt: skip
    d = e.handle_batch(steady, 2.0)
    assert python_path == []
    # a tool wait on a roomy pool is retained with a lease; a returned tool whose
    # lease still runs needs no new one
    actions = [(x.session_id, x.action.name, x.reason) for x in d.directives]
    assert actions == [(f"s{i}", "RETAIN_GPU", "tool_wait") for i in range(4)]
    ss = e.state.sessions
    for i in range(4):
        s = ss.slot_of[SessionId(f"s{i}")]
        assert ss.state[s] == STATE_TOOL_WAIT and ss.tier[s] == TIER_GPU
        assert ss.gpu_blocks[s] == -(-1_900 // 16)
        assert ss.lease_expires_s[s] > 2.0 and ss.timer_due_s[s] == ss.lease_expires_s[s]
    # a new session is made before the kernel runs, which applies its first
    # step on the worker it names; an ending session is released by the kernel
    d = e.handle_batch(
        [_ev(9, K.STEP_START, 500), _ev(0, K.TOOL_CALL_END, 2_000), _ev(1, K.SESSION_FINISH, 0)],
        3.0,
    )
    # (the first completion runs fair share's pass over live sessions: Python)
    assert python_path == [1]
    s0 = ss.slot_of[SessionId("s0")]
    assert ss.state[s0] == STATE_RUNNING and ss.timer_due_s[s0] == NO_TIMER
    s9 = ss.slot_of[SessionId("s9")]
    assert ss.home[s9] == 2 and ss.gpu_blocks[s9] == -(-500 // 16)
    assert SessionId("s1") not in ss.slot_of and e.fair.completed == [1]
    s2 = ss.slot_of[SessionId("s2")]
    d = e.handle_batch([_ev(2, K.SESSION_FINISH, 0), _ev(3, K.SESSION_ABORT, 0)], 3.5)
    assert python_path == [1]
    assert [(x.session_id, x.action.name, x.reason) for x in d.directives] == [
        ("s2", "RELEASE", "session_finish"),
        ("s3", "RELEASE", "session_abort"),
    ]
    assert e.fair.completed == [2] and len(ss) == 2
    assert e.state.residents_of(2) == [s9, s0] and ss.tenant[s2] == NO_SLOT


def _twins(monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, Engine, list[int]]:
    """Two engines (batch path on, off) and the sizes of what ``a`` hands to Python."""
    a, b = _engine(3600.0, True), _engine(3600.0, False)
    python_path: list[int] = []
    original = Engine._apply_events

    def counted(self: Engine, events: Any, now: float) -> None:
        if self is a:
            python_path.append(len(events))
        original(self, events, now)

    monkeypatch.setattr(Engine, "_apply_events", counted)
    return a, b, python_path


def _both(a: Engine, b: Engine, now: float, *events: SessionEvent) -> list[tuple[str, str, str]]:
    da, db = a.handle_batch(events, now), b.handle_batch(events, now)
    assert da == db
    _assert_same(a, b)
    return [(d.session_id, d.action.name, d.reason) for d in da.directives]


@pytest.mark.parametrize("last_step", [False, True])
def test_a_wait_whose_kv_was_offloaded_plans_its_prefetch_in_the_kernel(
    monkeypatch: pytest.MonkeyPatch, last_step: bool
) -> None:
    a, b, python_path = _twins(monkeypatch)
    _both(a, b, 0.0, _ev(1, K.STEP_START, 8_000))
    _both(a, b, 1.0, _ev(1, K.STEP_END, 8_000))
    # s2 fills the 1,100-block pool: relief (Python) moves idle s1 to the host
    out = _both(a, b, 2.0, _ev(2, K.STEP_START, 9_000, new_tokens=500))
    assert out == [("s1", "OFFLOAD_HOST", "pressure")]
    python_path.clear()
    out = _both(a, b, 3.0, _ev(1, K.TOOL_CALL_WAIT, 8_000, tool_name="bash", last_step=last_step))
    assert python_path == [1]  # the wait's new graph node is made in Python
    out = _both(
        a, b, 4.0, _ev(1, K.TOOL_CALL_END, 8_000), _ev(1, K.STEP_END, 8_100),
        _ev(1, K.TOOL_CALL_WAIT, 8_100, tool_name="bash", last_step=last_step),
    )  # fmt: skip
    ss = a.state.sessions
    s1 = ss.slot_of[SessionId("s1")]
    if last_step:
        # nothing will come back for it: no prefetch is planned
        assert ss.timer_due_s[s1] == NO_TIMER
    else:
        assert ss.tier[s1] == TIER_HOST and ss.timer_due_s[s1] > 4.0


def test_one_step_that_evicts_many_sessions_grows_the_directive_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, python_path = _twins(monkeypatch)
    _both(a, b, 0.0, *(_ev(i, K.STEP_START, 16) for i in range(300)))
    _both(a, b, 1.0, *(_ev(i, K.STEP_END, 16) for i in range(300)))
    python_path.clear()
    # 300 idle one-block sessions; this step needs 900 of the 1,100 blocks, and
    # relief up to the high watermark takes all the others: more directives
    # than the kernel's first buffer holds
    out = _both(a, b, 2.0, _ev(0, K.STEP_START, 14_400))
    assert python_path == []
    assert len(out) == 299 and {d[2] for d in out} == {"pressure"}
    assert len(a._batch._out[0]) >= 299


def test_an_expired_lease_offloads_and_the_timer_prefetches_in_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, python_path = _twins(monkeypatch)
    _both(a, b, 0.0, _ev(1, K.STEP_START, 8_000))
    _both(a, b, 1.0, _ev(1, K.TOOL_CALL_WAIT, 8_000, tool_name="bash"))
    s1 = a.state.sessions.slot_of[SessionId("s1")]
    lease_end = float(a.state.sessions.lease_expires_s[s1])

    def tick(now: float) -> list[tuple[str, str, str]]:
        da, db = a.tick(now), b.tick(now)
        assert da == db
        _assert_same(a, b)
        return [(d.session_id, d.action.name, d.reason) for d in da.directives]

    python_path.clear()
    # the lease runs out while the tool still runs: the KV goes to the host
    # (cheaper than a rebuild) and a prefetch is planned for the tool's return
    assert tick(lease_end + 0.5) == [("s1", "OFFLOAD_HOST", "lease_expired")]
    due = float(a.state.sessions.timer_due_s[s1])
    assert due > lease_end + 0.5 and a.state.sessions.tier[s1] == TIER_HOST
    assert tick(due) == [("s1", "PREFETCH_GPU", "prefetch_before_return")]
    assert a.state.sessions.tier[s1] == TIER_GPU and a.state.sessions.lease_expires_s[s1] > due
    assert python_path == []


def test_a_tool_returning_as_its_lease_ends_is_held_until_its_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, python_path = _twins(monkeypatch)
    _both(a, b, 0.0, _ev(1, K.STEP_START, 1_000))
    _both(a, b, 1.0, _ev(1, K.TOOL_CALL_WAIT, 1_000, tool_name="bash"))
    python_path.clear()
    da = a.handle_batch([_ev(1, K.TOOL_CALL_END, 1_000), _ev(1, K.STEP_START, 1_000)], 2.0)
    b.handle_batch([_ev(1, K.TOOL_CALL_END, 1_000), _ev(1, K.STEP_START, 1_000)], 2.0)
    lease = a.state.sessions.lease_expires_s[a.state.sessions.slot_of[SessionId("s1")]]
    assert not da.directives and lease == 0.0
    _both(a, b, 3.0, _ev(1, K.TOOL_CALL_WAIT, 1_000, tool_name="bash"))
    ttl_end = float(a.state.sessions.lease_expires_s[a.state.sessions.slot_of[SessionId("s1")]])
    # the tool returns 0.1 s before its lease ends: a fresh lease covers the queue
    out = _both(a, b, ttl_end - 0.1, _ev(1, K.TOOL_CALL_END, 1_200))
    assert out == [("s1", "RETAIN_GPU", "tool_returned")]
    assert python_path == []


def test_a_full_graph_shares_one_node_and_the_node_cache_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scheduler_service.graph.agent_graph import MAX_NODES

    a, b, python_path = _twins(monkeypatch)
    _both(a, b, 0.0, _ev(1, K.STEP_START, 1_000), _ev(2, K.STEP_START, 1_000))
    for i in range(MAX_NODES + 100):  # tool names past the graph's cap
        now = 1.0 + i
        _both(
            a, b, now, _ev(1, K.TOOL_CALL_WAIT, 1_000, tool_name=f"tool{i}"),
            _ev(2, K.TOOL_CALL_WAIT, 1_000, tool_name=f"tool{i}"),
            _ev(1, K.TOOL_CALL_END, 1_000), _ev(2, K.TOOL_CALL_END, 1_000),
            _ev(1, K.STEP_START, 1_000), _ev(2, K.STEP_START, 1_000),
        )  # fmt: skip
    graph = a.graphs.graphs[0]
    assert len(graph.keys) == MAX_NODES
    assert graph.keys[0] == (0, "finish") and graph.keys[-1] == (2, "*other*")
    # Python made the first two sessions (no graph yet) and each node: a first
    # wait on a tool, then the shared node of the tools past the cap; the
    # second wait on a tool, and every later one, was the kernel's
    assert python_path == [1] * (2 + MAX_NODES - 1)
    assert len(a._batch._nodes) <= MAX_NODES


def test_graphs_made_on_a_wall_clock_let_the_kernel_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's clock reads ~1.7e9 s: a graph must not start out due to rescale."""
    a, b, python_path = _twins(monkeypatch)
    t = 1.76e9
    _both(a, b, t, *(_ev(i, K.STEP_START, 1_000) for i in range(8)))
    assert python_path == [1] * 8  # new sessions are made in Python
    python_path.clear()
    _both(a, b, t + 1.0, *(_ev(i, K.STEP_START, 1_200) for i in range(8)))
    assert python_path == []


def test_an_engine_restored_from_a_snapshot_keeps_the_batch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, _ = _twins(monkeypatch)
    _both(a, b, 0.0, *(_ev(i, K.STEP_START, 1_000) for i in range(4)))
    restored = pickle.loads(pickle.dumps(a, protocol=pickle.HIGHEST_PROTOCOL))
    assert restored.kernels is kernels.NUMBA and restored.placer.kernels is kernels.NUMBA
    assert restored.retention.kernels is kernels.NUMBA
    assert restored._batch.usable() and restored._batch.engine is restored
    restored._batch.min_batch = 1
    steps = [_ev(i, K.TOOL_CALL_WAIT, 1_100, tool_name="bash") for i in range(4)]
    assert restored.handle_batch(steps, 1.0) == b.handle_batch(steps, 1.0)
    _assert_same(restored, b)


def test_tenant_quotas_keep_the_python_path() -> None:
    e = _engine(3600.0, True)
    assert e._batch.usable()
    e.create_tenant(TenantSpec(TenantId("t"), kv_quota_gpu_bytes=1 << 30))
    assert not e._batch.usable()


def test_the_kernel_constants_are_the_engines() -> None:
    from scheduler_service import retention

    assert (kev.TIER_NONE, kev.TIER_GPU, kev.TIER_HOST) == (TIER_NONE, TIER_GPU, TIER_HOST)
    assert (kev.STATE_RUNNING, kev.STATE_TOOL_WAIT) == (STATE_RUNNING, STATE_TOOL_WAIT)
    assert (kev.NO_SLOT, kev.NO_TIMER) == (NO_SLOT, NO_TIMER)
    assert (kev.TIMER_LEASE, kev.TIMER_PREFETCH) == (
        retention.TIMER_LEASE,
        retention.TIMER_PREFETCH,
    )
    assert kev.PREFETCHED == retention.PREFETCHED
    assert (kev.K_STEP_START, kev.K_TOOL_CALL_WAIT, kev.K_TOOL_CALL_END) == (
        K.STEP_START,
        K.TOOL_CALL_WAIT,
        K.TOOL_CALL_END,
    )
    assert (kev.K_STEP_END, kev.K_SESSION_FINISH, kev.K_SESSION_ABORT) == (
        K.STEP_END,
        K.SESSION_FINISH,
        K.SESSION_ABORT,
    )
    from scheduler_service.graph.agent_graph import FINISH_NODE
    from scheduler_service.kernels import pressure

    assert kev.FINISH_NODE == FINISH_NODE
    assert (pressure.STATE_TOOL_WAIT, pressure.TIER_GPU, pressure.NO_SLOT) == (
        STATE_TOOL_WAIT,
        TIER_GPU,
        NO_SLOT,
    )
    assert pressure.PREFETCHED == retention.PREFETCHED


def _ev(i: int, kind: EventKind, ctx: int, **kw: Any) -> SessionEvent:
    return SessionEvent(
        EventId(f"{kind.name}{i}-{ctx}"),
        SessionId(f"s{i}"),
        TenantId("t"),
        "coder",
        1,
        kind,
        ctx,
        worker_id=WORKERS[2],
        **kw,
    )


def test_the_kernels_see_a_knob_changed_after_start() -> None:
    import dataclasses

    from scheduler_service.engine_batch import batch_params

    e = _engine(3600.0, True)
    for f in dataclasses.fields(e.config):
        value = getattr(e.config, f.name)
        if isinstance(value, float) and not isinstance(value, bool):
            setattr(e.config, f.name, value * 0.5 + 0.125)
        elif isinstance(value, GraphPrior):
            setattr(e.config, f.name, dataclasses.replace(value, hint_weight=value.hint_weight + 1))
        else:
            continue
        assert e._batch._params().tolist() == batch_params(e.config).tolist(), f.name
