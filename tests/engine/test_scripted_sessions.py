"""Scripted sessions: the exact directives the engine sends, in order.

Worker figures used throughout: 16-token blocks, 131,072 B/token (an 8B
model), 20,000 prefill tokens/s, 25 GB/s host link, 10,000 GPU blocks.
A 16,000-token context is 1,000 blocks and rebuilds in
0.8 s × (1 + 16,000 / 65,536) = 0.9953125 s.
"""

from __future__ import annotations

from typing import Any

import pytest

from scheduler_service.domain import Action, EventKind, SessionId, Tier, WorkerId

K = EventKind
REBUILD_16K_S = 0.8 * (1 + 16_000 / 65_536)
P_CONTINUE_PRIOR = 0.95


def brief(ds: list[Any]) -> list[tuple[str, str, str]]:
    return [(d.action.name, d.session_id, d.reason) for d in ds]


def test_short_wait_under_low_pressure_is_a_ski_rental_lease_released_by_tick(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    assert sc.event(1.0, "s1", K.STEP_START, 16_000) == []
    # the rest of the pool is busy: 7,500 of 10,000 blocks used -> shadow price
    # ((0.75 - 0.5) / 0.5)^2 = 0.25 GPU-s/s for the whole pool
    assert sc.heartbeat(2.0, "w1", free_blocks=2_500) == []
    assert sc.event(3.0, "s1", K.STEP_END, 16_000) == []
    [d] = sc.event(3.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    # holding 1,000 of 10,000 blocks costs 0.025 GPU-s/s; rebuilding costs
    # P(continue) × 0.9953 s; the lease lasts until those are equal
    ttl = P_CONTINUE_PRIOR * REBUILD_16K_S / (0.25 * 1_000 / 10_000)
    assert d.action is Action.RETAIN_GPU
    assert d.lease_ttl_s == pytest.approx(ttl, rel=1e-12)
    assert (d.directive_id, d.worker_id, d.session_id, d.leader_epoch) == ("d1-1", "w1", "s1", 1)
    assert sc.tick(3.0 + ttl - 0.01) == []
    [rel] = sc.tick(3.0 + ttl)
    assert (rel.action, rel.reason, rel.directive_id) == (Action.RELEASE, "lease_expired", "d1-2")
    view = sc.engine.session_view(SessionId("s1"), 3.0 + ttl)
    assert view.tier is Tier.NONE and view.lease_remaining_s == 0.0
    assert sc.event(60.0, "s1", K.TOOL_CALL_END, 16_100) == []
    assert sc.event(60.0, "s1", K.STEP_START, 16_100) == []
    [fin] = sc.event(61.0, "s1", K.SESSION_FINISH, 16_200)
    assert (fin.action, fin.reason, fin.directive_id) == (Action.RELEASE, "session_finish", "d1-3")
    assert sc.engine.session_view(SessionId("s1"), 61.0) is None
    assert brief(sc.log) == [
        ("RETAIN_GPU", "s1", "tool_wait"),
        ("RELEASE", "s1", "lease_expired"),
        ("RELEASE", "s1", "session_finish"),
    ]


def test_idle_pool_retains_for_the_longest_lease(script: Any) -> None:
    sc = script(max_lease_ttl_s=120.0)
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    [d] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    # holding is free below half utilisation: the lease is capped, never infinite
    assert (d.action, d.lease_ttl_s) == (Action.RETAIN_GPU, 120.0)


def _train_pytest_takes_60s(sc: Any, sessions: int = 10) -> float:
    """Earlier sessions of the same agent type: pytest returns after 60 s, then one more step."""
    t = 10.0
    for i in range(sessions):
        sid = f"train{i}"
        sc.event(t, sid, K.STEP_START, 1_600)
        sc.event(t + 1, sid, K.TOOL_CALL_WAIT, 1_600, tool_name="pytest")
        sc.event(t + 61, sid, K.TOOL_CALL_END, 1_700)
        sc.event(t + 61, sid, K.STEP_START, 1_700)
        sc.event(t + 62, sid, K.STEP_END, 1_800)
        sc.event(t + 62, sid, K.SESSION_FINISH, 1_800)
        t += 100.0
    sc.log.clear()
    return t


def test_long_predicted_wait_under_pressure_offloads_then_prefetches_before_return(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    t = _train_pytest_takes_60s(sc)
    sc.event(t, "s1", K.STEP_START, 16_000)
    # 9,000 of 10,000 blocks in use -> shadow price ((0.9 - 0.5) / 0.5)^2 = 0.64
    assert sc.heartbeat(t + 0.5, "w1", free_blocks=1_000, host_free=20_000) == []
    [off] = sc.event(t + 1, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="pytest")
    # holding 10% of a pool at 0.64 for ~60 s (3.8 GPU-s) loses to a 2.1 GB copy
    # out and back over the host link
    move_s = 1_000 * 16 * 131_072 / 25e9
    assert off.action is Action.OFFLOAD_HOST
    assert off.complete_within_s == pytest.approx(move_s)
    view = sc.engine.session_view(SessionId("s1"), t + 1)
    assert view.tier is Tier.HOST
    # tick four times a second: the reload starts before the tool's predicted return
    prefetched_at = None
    for quarter in range(8, 244):
        sec = quarter / 4
        ds = sc.tick(t + sec)
        if ds:
            assert prefetched_at is None
            assert len(ds) == 1, ds
            [pf] = ds
            assert pf.action is Action.PREFETCH_GPU and pf.reason == "prefetch_before_return"
            assert pf.lease_ttl_s > 0  # held until used, as a lease
            prefetched_at = t + sec
            # it has at least the reload time and at most the predicted wait left
            assert move_s <= pf.complete_within_s <= 61.0 - sec
    assert prefetched_at is not None and t + 55 <= prefetched_at < t + 61
    # the tool returns at t + 61: KV is already back, nothing more to do
    assert sc.event(t + 61, "s1", K.TOOL_CALL_END, 16_100) == []
    assert sc.engine.session_view(SessionId("s1"), t + 61).tier is Tier.GPU
    sc.event(t + 61, "s1", K.STEP_START, 16_100)
    sc.event(t + 62, "s1", K.SESSION_FINISH, 16_200)
    assert brief(sc.log) == [
        ("OFFLOAD_HOST", "s1", "tool_wait"),
        ("PREFETCH_GPU", "s1", "prefetch_before_return"),
        ("RELEASE", "s1", "session_finish"),
    ]


def test_tool_returning_early_reloads_at_once(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    t = _train_pytest_takes_60s(sc)
    sc.event(t, "s1", K.STEP_START, 16_000)
    sc.heartbeat(t + 0.5, "w1", free_blocks=1_000, host_free=20_000)
    sc.event(t + 1, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="pytest")
    [pf] = sc.event(t + 5, "s1", K.TOOL_CALL_END, 16_000)
    assert (pf.action, pf.reason) == (Action.PREFETCH_GPU, "tool_returned")
    # the planned prefetch is cancelled: no second reload later
    assert [d for sec in range(6, 90) for d in sc.tick(t + sec)] == []


def test_lease_is_cut_short_when_pressure_rises(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    [d] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    assert (d.action, d.lease_ttl_s) == (Action.RETAIN_GPU, 300.0)
    # the pool fills to 95%: shadow price ((0.95 - 0.5) / 0.5)^2 = 0.81
    [cut] = sc.heartbeat(3.0, "w1", free_blocks=500)
    assert (cut.action, cut.reason) == (Action.RETAIN_GPU, "pressure_redecide")
    assert cut.lease_ttl_s == pytest.approx(P_CONTINUE_PRIOR * REBUILD_16K_S / 0.081, rel=1e-12)
    # the shorter lease is the one tick enforces
    assert sc.tick(3.0 + cut.lease_ttl_s - 0.01) == []
    assert brief(sc.tick(3.0 + cut.lease_ttl_s)) == [("RELEASE", "s1", "lease_expired")]


def test_eviction_order_under_pressure_is_cost_aware_farthest_next_use(script: Any) -> None:
    sc = script(high_watermark=0.25)
    sc.worker("w1", gpu_blocks=1_400)
    # six sessions of 100 blocks each wait on tools with very different hints
    hints = {"a": 10.0, "b": 1_000.0, "c": 100.0, "d": 100.0, "e": 1.0, "f": 300.0}
    for sid in hints:
        sc.event(1.0, sid, K.STEP_START, 1_600)
    for sid, hint in hints.items():
        [d] = sc.event(
            2.0,
            sid,
            K.TOOL_CALL_WAIT,
            1_600,
            tool_name=f"tool_{sid}",
            expected_tool_latency_s=hint,
            last_step=(sid == "d"),
        )
        assert d.action is Action.RETAIN_GPU  # 600 of 1,400 blocks: holding is free
    # an 800-block step fills the pool: free 0 < 5% -> evict until 25% (350 blocks) is free
    ds = sc.event(3.0, "g", K.STEP_START, 12_800)
    # equal sizes: the order is predicted time to next use / P(continue):
    # d said it was its last step (P(continue) 0 -> clamped 0.01), then the hints
    assert brief(ds) == [
        ("EVICT_NOW", "d", "pressure"),
        ("EVICT_NOW", "b", "pressure"),
        ("EVICT_NOW", "f", "pressure"),
        ("EVICT_NOW", "c", "pressure"),
    ]
    assert all(d.worker_id == "w1" for d in ds)
    views = {sid: sc.engine.session_view(SessionId(sid), 3.0).tier for sid in "abcdefg"}
    assert views == {
        "a": Tier.GPU,
        "b": Tier.NONE,
        "c": Tier.NONE,
        "d": Tier.NONE,
        "e": Tier.GPU,
        "f": Tier.NONE,
        "g": Tier.GPU,
    }
    [w] = sc.engine.worker_views()
    assert w.gpu_used_blocks == 1_000


def test_pressure_relief_makes_room_for_the_steps_queued_on_a_worker(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=2_000)
    hints = {"a": 2.0, "b": 30.0, "c": 10.0}
    for sid in hints:
        sc.event(1.0, sid, K.STEP_START, 3_200)  # 200 blocks each
    for sid, hint in hints.items():
        [d] = sc.event(
            2.0, sid, K.TOOL_CALL_WAIT, 3_200, tool_name=f"t_{sid}", expected_tool_latency_s=hint
        )
        assert d.action is Action.RETAIN_GPU  # 600 of 2,000 blocks: holding is free
    # the worker reports 1,000 of 2,000 blocks free, far above the 5% watermark: nothing to do ...
    assert sc.heartbeat(3.0, "w1", free_blocks=1_000) == []
    # ... until 19,200 prefill tokens (1,200 blocks) wait in its queue: room is made
    # for them, farthest predicted use first
    ds = sc.heartbeat(4.0, "w1", free_blocks=1_000, queued=19_200)
    # (the queued demand also raised the memory's price: the other leases shrink)
    assert brief(ds) == [
        ("EVICT_NOW", "b", "pressure"),
        ("RETAIN_GPU", "c", "pressure_redecide"),
        ("RETAIN_GPU", "a", "pressure_redecide"),
    ]
    # with room for the queue, nothing more is evicted
    assert sc.heartbeat(5.0, "w1", free_blocks=1_200, queued=19_200) == []


def test_eviction_offloads_when_the_host_tier_has_room(script: Any) -> None:
    sc = script(high_watermark=0.1)
    sc.worker("w1", gpu_blocks=2_100, host_blocks=10_000)
    sc.event(1.0, "a", K.STEP_START, 16_000)  # 1,000 blocks: a reload beats a rebuild
    [d] = sc.event(2.0, "a", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    assert d.action is Action.RETAIN_GPU  # under half full: holding is free
    ds = sc.event(3.0, "g", K.STEP_START, 17_600)
    assert brief(ds) == [("OFFLOAD_HOST", "a", "pressure")]
    assert sc.engine.session_view(SessionId("a"), 3.0).tier is Tier.HOST


def test_step_on_another_worker_releases_the_old_copy(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.worker("w2")
    sc.event(1.0, "s1", K.STEP_START, 16_000, worker="w1")
    sc.event(2.0, "s1", K.STEP_END, 16_000, worker="w1")
    [d] = sc.event(3.0, "s1", K.STEP_START, 16_500, worker="w2")
    assert (d.action, d.worker_id, d.reason) == (Action.RELEASE, WorkerId("w1"), "moved")
    view = sc.engine.session_view(SessionId("s1"), 3.0)
    assert (view.home_worker_id, view.tier) == ("w2", Tier.GPU)
    assert [w.gpu_used_blocks for w in sc.engine.worker_views()] == [0, 1_032]


def test_abort_releases_and_unknown_abort_is_a_no_op(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    assert sc.event(1.0, "ghost", K.SESSION_ABORT, 0) == []
    sc.event(1.0, "s1", K.STEP_START, 1_000)
    assert brief(sc.event(2.0, "s1", K.SESSION_ABORT, 1_000)) == [
        ("RELEASE", "s1", "session_abort")
    ]
    stats = sc.engine.stats(2.0)
    assert stats.tenants[0].completed_sessions == 0 and stats.tenants[0].events == 3


def test_same_calls_give_the_same_decisions(script: Any) -> None:
    def run() -> list[Any]:
        sc = script(high_watermark=0.25)
        sc.worker("w1", gpu_blocks=1_400, host_blocks=500)
        sc.worker("w2", gpu_blocks=1_400)
        for i in range(30):
            sid, w = f"s{i % 9}", f"w{1 + i % 2}"
            sc.event(i, sid, K.STEP_START, 1_600 + 160 * i, worker=w)
            sc.event(
                i + 0.5,
                sid,
                K.TOOL_CALL_WAIT,
                1_600 + 160 * i,
                worker=w,
                tool_name=f"t{i % 3}",
                expected_tool_latency_s=float(i % 4),
            )
            sc.tick(i + 0.7)
            sc.event(i + 0.9, sid, K.TOOL_CALL_END, 1_700 + 160 * i, worker=w)
        sc.tick(1_000.0)
        return sc.log

    first, second = run(), run()
    assert len(first) > 10
    assert first == second


def test_a_second_tool_wait_gets_its_own_lease(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    sc.heartbeat(1.5, "w1", free_blocks=2_500)
    [first] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    # a second call while the first is out: a fresh decision, not the old lease
    [second] = sc.event(4.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="grep")
    assert (first.action, second.action) == (Action.RETAIN_GPU, Action.RETAIN_GPU)
    assert second.lease_ttl_s == pytest.approx(first.lease_ttl_s)
    assert sc.tick(2.0 + first.lease_ttl_s) == []  # the first expiry no longer applies
    assert brief(sc.tick(4.0 + second.lease_ttl_s)) == [("RELEASE", "s1", "lease_expired")]


def test_a_pickled_engine_decides_exactly_like_the_original(script: Any) -> None:
    import pickle

    sc = script()
    sc.worker("w1", gpu_blocks=2_000, host_blocks=4_000)
    for i in range(5):
        sc.event(1.0 + i, f"s{i}", K.STEP_START, 3_200 * (i + 1))
        sc.event(2.0 + i, f"s{i}", K.TOOL_CALL_WAIT, 3_200 * (i + 1), tool_name="bash")
    copy = pickle.loads(pickle.dumps(sc.engine))
    # the restored arrays are live: element views write through to them
    slot = copy.state.sessions.slot_of[SessionId("s0")]
    assert copy.state.sessions.context_tokens_v[slot] == copy.state.sessions.context_tokens[slot]
    later = [
        (20.0, "s0", K.TOOL_CALL_END, 3_300),
        (20.0, "s0", K.STEP_START, 3_300),
        (21.0, "n", K.STEP_START, 12_800),
        (400.0, "s1", K.SESSION_FINISH, 6_400),
    ]
    originals, copies = [], []
    for now, sid, kind, ctx in later:
        originals.append(sc.engine.handle(_ev(sid, kind, ctx), now))
        copies.append(copy.handle(_ev(sid, kind, ctx), now))
    originals.append(sc.engine.tick(500.0))
    copies.append(copy.tick(500.0))
    assert originals == copies
    assert any(d.directives for d in originals)


def _ev(sid: str, kind: EventKind, ctx: int) -> Any:
    from scheduler_service.domain import EventId, SessionEvent, TenantId

    return SessionEvent(
        EventId("e"),
        SessionId(sid),
        TenantId("t1"),
        "coder",
        0,
        kind,
        ctx,
        worker_id=WorkerId("w1"),
    )


def test_an_expired_lease_switches_to_the_host_tier_when_that_beats_a_rebuild(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    sc.heartbeat(1.5, "w1", free_blocks=2_500, host_free=20_000)  # shadow price 0.25
    [d] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="ls", expected_tool_latency_s=1.0)
    # a short wait: retain, until holding has cost what an offload and reload would
    # (the copy out while still held, plus both transfers on the link)
    move_s = 1_000 * 16 * 131_072 / 25e9
    hold_rate = 0.25 * 1_000 / 10_000
    ttl = move_s + 0.25 * (move_s + P_CONTINUE_PRIOR * move_s) / hold_rate
    assert d.action is Action.RETAIN_GPU
    assert d.lease_ttl_s == pytest.approx(ttl, rel=1e-9)
    [off] = sc.tick(2.0 + d.lease_ttl_s)
    assert (off.action, off.reason) == (Action.OFFLOAD_HOST, "lease_expired")
    assert sc.engine.session_view(SessionId("s1"), 4.0).tier is Tier.HOST
    [pf] = sc.event(5.0, "s1", K.TOOL_CALL_END, 16_000)
    assert (pf.action, pf.reason) == (Action.PREFETCH_GPU, "tool_returned")


def test_a_silent_session_expires_and_its_kv_is_released(script: Any) -> None:
    sc = script(session_idle_ttl_s=600.0)
    sc.worker("w1")
    sc.event(1.0, "quiet", K.STEP_START, 1_600)
    sc.event(2.0, "quiet", K.STEP_END, 1_600)
    sc.event(1.0, "busy", K.STEP_START, 1_600)  # a step may run long: never expired
    assert sc.tick(601.9) == []
    assert brief(sc.tick(602.1)) == [("RELEASE", "quiet", "session_expired")]
    assert sc.engine.session_view(SessionId("quiet"), 602.1) is None
    assert sc.engine.session_view(SessionId("busy"), 602.1) is not None
    assert sc.engine.stats(602.1).tenants[0].completed_sessions == 0
    # once its step ends, the long-running one expires a TTL after its last event
    sc.event(700.0, "busy", K.STEP_END, 1_600)
    assert sc.tick(1_299.9) == []
    assert brief(sc.tick(1_300.1)) == [("RELEASE", "busy", "session_expired")]
    # an event stamped earlier than those before it (a clock stepped back) is
    # still its session's last: the scan is not skipped past it
    sc.event(1_400.0, "late", K.STEP_START, 1_600)
    sc.event(1_400.0, "late", K.STEP_END, 1_600)
    assert sc.tick(1_500.0) == []
    sc.event(100.0, "early", K.STEP_START, 1_600)
    sc.event(100.0, "early", K.STEP_END, 1_600)
    assert brief(sc.tick(1_500.0)) == [("RELEASE", "early", "session_expired")]
    assert brief(sc.tick(2_000.1)) == [("RELEASE", "late", "session_expired")]


def test_a_returned_tool_leases_the_kv_until_the_queued_step_is_likely_admitted(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=20_000)
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    sc.heartbeat(2.0, "w1", free_blocks=15_000)
    sc.event(3.0, "s1", K.STEP_END, 16_000)
    [lease] = sc.event(3.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    assert lease.action is Action.RETAIN_GPU
    # the home now has 10 s of prefill queued (200k tokens at 20k tokens/s), for
    # which its free memory has room
    sc.heartbeat(4.0, "w1", free_blocks=15_000, queued=200_000)
    # the tool returns with 1 s of lease left: the step will wait ~10 s in the
    # queue, so the KV it is about to reuse is leased for 1 + 2 × 10 s
    returned_at = 3.0 + lease.lease_ttl_s - 1.0
    [hold] = sc.event(returned_at, "s1", K.TOOL_CALL_END, 16_100)
    assert (hold.action, hold.reason) == (Action.RETAIN_GPU, "tool_returned")
    assert hold.lease_ttl_s == pytest.approx(21.0)
    # running: no lease timer of the engine's fires while the step is queued
    assert sc.tick(returned_at + 30.0) == []
    assert sc.event(returned_at + 8.0, "s1", K.STEP_START, 16_100) == []
    # a lease that already covers the queue (1 s now: 3 s needed) is left as it is
    sc.heartbeat(returned_at + 8.5, "w1", free_blocks=15_000, queued=20_000)
    sc.event(returned_at + 9.0, "s1", K.STEP_END, 16_200)
    [again] = sc.event(returned_at + 9.0, "s1", K.TOOL_CALL_WAIT, 16_200, tool_name="bash")
    assert again.action is Action.RETAIN_GPU and again.lease_ttl_s > 4.0
    assert sc.event(returned_at + 10.0, "s1", K.TOOL_CALL_END, 16_300) == []
