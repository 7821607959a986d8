"""Tenant limits: GPU / host KV quotas and max_concurrent_sessions.

Worker figures as in the scripted-session tests: 16-token blocks of 131,072
B/token, so one block is 2 MiB; a 1,600-token context is 100 blocks and a
16,000-token one 1,000 blocks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.domain import (
    Action,
    CacheSpec,
    DirectiveOutcome,
    EventId,
    EventKind,
    KvEvent,
    KvEventKind,
    PlaceRequest,
    PoolInventory,
    SessionEvent,
    SessionId,
    SessionResidency,
    TenantId,
    TenantLimitExceeded,
    TenantSpec,
    Tier,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine, EngineConfig
from scheduler_service.state import NO_SLOT, STATE_RUNNING, TIER_GPU
from tests.engine.agent_loop import NEXT

K = EventKind
BLOCK = 16 * 131_072  # bytes in one block of the scripted worker


def brief(ds: list[Any]) -> list[tuple[str, str, str]]:
    return [(d.action.name, d.session_id, d.reason) for d in ds]


def tenant(sc: Any, tid: str, **limits: int) -> None:
    sc.engine.create_tenant(TenantSpec(TenantId(tid), **limits))


def set_limits(sc: Any, tid: str, **limits: int) -> None:
    spec = TenantSpec(TenantId(tid), **limits)
    sc.engine.update_tenant(spec, fields=list(limits))


def usage(e: Engine, tid: str) -> tuple[int, int]:
    [t] = [x for x in e.stats(0.0).tenants if x.tenant_id == tid]
    return t.kv_gpu_bytes, t.kv_host_bytes


def req(sid: str, tid: str) -> PlaceRequest:
    return PlaceRequest(SessionId(sid), TenantId(tid), "coder", 0, 1_600)


# -- retains over the GPU quota ---------------------------------------------------------------


def test_a_tenant_over_its_gpu_quota_gets_no_retain_an_identical_one_under_it_does(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    tenant(sc, "hog", kv_quota_gpu_bytes=500 * BLOCK)  # half of one 16k-token session
    tenant(sc, "fine", kv_quota_gpu_bytes=5_000 * BLOCK)
    for sid, tid in (("h", "hog"), ("f", "fine")):
        sc.event(1.0, sid, K.STEP_START, 16_000, tenant=tid)
    assert usage(sc.engine, "hog") == (1_000 * BLOCK, 0)
    [f] = sc.event(2.0, "f", K.TOOL_CALL_WAIT, 16_000, tenant="fine", tool_name="bash")
    [h] = sc.event(2.0, "h", K.TOOL_CALL_WAIT, 16_000, tenant="hog", tool_name="bash")
    # the pool is nearly empty: holding is free, so both would be retained
    assert (f.action, f.reason) == (Action.RETAIN_GPU, "tool_wait")
    # a 2 GB copy out and back beats a 1 s rebuild: the next-best is the host tier
    assert (h.action, h.reason) == (Action.OFFLOAD_HOST, "over_quota")
    assert sc.engine.session_view(SessionId("h"), 2.0).tier is Tier.HOST
    assert usage(sc.engine, "hog") == (0, 1_000 * BLOCK)


def test_over_the_gpu_quota_with_a_full_host_quota_the_next_best_is_a_release(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    tenant(sc, "hog", kv_quota_gpu_bytes=500 * BLOCK, kv_quota_host_bytes=999 * BLOCK)
    sc.event(1.0, "h", K.STEP_START, 16_000, tenant="hog")
    [h] = sc.event(2.0, "h", K.TOOL_CALL_WAIT, 16_000, tenant="hog", tool_name="bash")
    assert (h.action, h.reason) == (Action.RELEASE, "over_quota")
    assert usage(sc.engine, "hog") == (0, 0)


def test_an_offload_that_would_exceed_the_host_quota_releases_instead(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    tenant(sc, "t", kv_quota_host_bytes=999 * BLOCK)
    tenant(sc, "u")
    sc.event(1.0, "a", K.STEP_START, 16_000, tenant="t")
    sc.event(1.0, "b", K.STEP_START, 16_000, tenant="u")
    # 9,000 of 10,000 blocks in use: holding a 1,000-block session for a long
    # wait costs more than the copy out and back
    sc.heartbeat(1.5, "w1", free_blocks=1_000, host_free=20_000)
    [b] = sc.event(2.0, "b", K.TOOL_CALL_WAIT, 16_000, tenant="u", expected_tool_latency_s=600.0)
    [a] = sc.event(2.0, "a", K.TOOL_CALL_WAIT, 16_000, tenant="t", expected_tool_latency_s=600.0)
    assert (b.action, b.reason) == (Action.OFFLOAD_HOST, "tool_wait")
    assert (a.action, a.reason) == (Action.RELEASE, "over_quota")


def test_a_wait_of_unknown_size_gets_no_lease_over_the_gpu_quota(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    tenant(sc, "hog", kv_quota_gpu_bytes=50 * BLOCK)
    sc.event(1.0, "big", K.STEP_START, 1_600, tenant="hog")  # 100 blocks: over
    sc.event(1.0, "empty", K.STEP_START, 0, tenant="hog")
    [d] = sc.event(2.0, "empty", K.TOOL_CALL_WAIT, 0, tenant="hog", tool_name="bash")
    assert (d.action, d.reason) == (Action.RELEASE, "over_quota")


def test_a_prefetch_that_would_go_over_the_gpu_quota_is_not_made(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    tenant(sc, "t")
    sc.event(1.0, "s1", K.STEP_START, 16_000, tenant="t")
    sc.heartbeat(1.5, "w1", free_blocks=1_000, host_free=20_000)
    [off] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tenant="t", expected_tool_latency_s=600.0)
    assert off.action is Action.OFFLOAD_HOST
    set_limits(sc, "t", kv_quota_gpu_bytes=999 * BLOCK)
    assert sc.event(5.0, "s1", K.TOOL_CALL_END, 16_000, tenant="t") == []
    assert sc.engine.session_view(SessionId("s1"), 5.0).tier is Tier.HOST
    set_limits(sc, "t", kv_quota_gpu_bytes=1_000 * BLOCK)  # exactly fits: allowed
    sc.event(6.0, "s1", K.TOOL_CALL_WAIT, 16_000, tenant="t", expected_tool_latency_s=600.0)
    [pf] = sc.event(7.0, "s1", K.TOOL_CALL_END, 16_000, tenant="t")
    assert (pf.action, pf.reason) == (Action.PREFETCH_GPU, "tool_returned")


# -- eviction order ---------------------------------------------------------------------------


def _six_waiting(sc: Any) -> None:
    """Six 100-block sessions wait on tools: two of 'nice', four of 'hog' (one running)."""
    waits = {
        ("n1", "nice"): 1_000.0,
        ("n2", "nice"): 300.0,
        ("h1", "hog"): 1.0,
        ("h2", "hog"): 10.0,
        ("h3", "hog"): 100.0,
    }
    for sid, tid in [*waits, ("h4", "hog")]:
        sc.event(1.0, sid, K.STEP_START, 1_600, tenant=tid)
    for (sid, tid), hint in waits.items():
        [d] = sc.event(
            2.0,
            sid,
            K.TOOL_CALL_WAIT,
            1_600,
            tenant=tid,
            tool_name=f"tool_{sid}",
            expected_tool_latency_s=hint,
        )
        assert d.action is Action.RETAIN_GPU  # under half full: holding is free


def test_under_pressure_the_tenant_over_quota_is_evicted_first(script: Any) -> None:
    def run(hog_quota: int) -> list[tuple[str, str, str]]:
        sc = script(high_watermark=0.25)
        sc.worker("w1", gpu_blocks=1_400)
        tenant(sc, "nice")
        tenant(sc, "hog")
        _six_waiting(sc)
        set_limits(sc, "hog", kv_quota_gpu_bytes=hog_quota)
        # an 800-block step fills the pool: free 0 -> evict until 350 blocks are free
        return brief(sc.event(3.0, "g", K.STEP_START, 12_800, tenant="nice"))

    # without a quota the farthest next uses go first, whoever owns them
    assert run(0) == [
        ("EVICT_NOW", "n1", "pressure"),
        ("EVICT_NOW", "n2", "pressure"),
        ("EVICT_NOW", "h3", "pressure"),
        ("EVICT_NOW", "h2", "pressure"),
    ]
    # hog holds 400 blocks against a 300-block quota: its idle sessions go
    # first, in their own order; the running one is never a victim
    assert run(300 * BLOCK) == [
        ("EVICT_NOW", "h3", "pressure"),
        ("EVICT_NOW", "h2", "pressure"),
        ("EVICT_NOW", "h1", "pressure"),
        ("EVICT_NOW", "n1", "pressure"),
    ]


# -- tick -------------------------------------------------------------------------------------


def test_tick_brings_a_tenant_over_its_gpu_quota_back_under(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=1_400)
    tenant(sc, "nice", kv_quota_gpu_bytes=200 * BLOCK)  # exactly at it: not over
    tenant(sc, "hog")
    _six_waiting(sc)
    assert sc.tick(3.0) == []  # no quota: nothing to enforce
    assert usage(sc.engine, "hog") == (400 * BLOCK, 0)
    set_limits(sc, "hog", kv_quota_gpu_bytes=250 * BLOCK)
    # 400 blocks against 250: the two farthest idle ones go, then it is under
    assert brief(sc.tick(4.0)) == [
        ("EVICT_NOW", "h3", "over_quota"),
        ("EVICT_NOW", "h2", "over_quota"),
    ]
    assert usage(sc.engine, "hog") == (200 * BLOCK, 0)
    assert usage(sc.engine, "nice") == (200 * BLOCK, 0)
    tiers = {s: sc.engine.session_view(SessionId(s), 4.0).tier for s in ("h1", "h4", "n1", "n2")}
    assert set(tiers.values()) == {Tier.GPU}
    assert sc.tick(5.0) == []  # under now: nothing more
    # below what its running session holds: every idle one goes, the running one stays
    set_limits(sc, "hog", kv_quota_gpu_bytes=50 * BLOCK)
    assert brief(sc.tick(6.0)) == [("EVICT_NOW", "h1", "over_quota")]
    assert sc.engine.session_view(SessionId("h4"), 6.0).tier is Tier.GPU
    assert sc.tick(7.0) == []  # still over, but nothing idle is left to take


def test_tick_offloads_an_over_quota_session_when_the_host_pays(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    tenant(sc, "t")
    sc.event(1.0, "s1", K.STEP_START, 16_000, tenant="t")
    sc.event(2.0, "s1", K.STEP_END, 16_000, tenant="t")  # idle, still on the GPU
    set_limits(sc, "t", kv_quota_gpu_bytes=10 * BLOCK)
    assert brief(sc.tick(3.0)) == [("OFFLOAD_HOST", "s1", "over_quota")]
    assert usage(sc.engine, "t") == (0, 1_000 * BLOCK)


def test_lowering_a_quota_takes_effect_and_zero_means_unlimited(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    tenant(sc, "t", kv_quota_gpu_bytes=10_000 * BLOCK)
    sc.event(1.0, "s1", K.STEP_START, 16_000, tenant="t")
    [d] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tenant="t", tool_name="bash")
    assert (d.action, d.reason) == (Action.RETAIN_GPU, "tool_wait")
    sc.event(3.0, "s1", K.TOOL_CALL_END, 16_000, tenant="t")
    sc.event(3.0, "s1", K.STEP_START, 16_000, tenant="t")
    set_limits(sc, "t", kv_quota_gpu_bytes=100 * BLOCK)
    [d] = sc.event(4.0, "s1", K.TOOL_CALL_WAIT, 16_000, tenant="t", tool_name="bash")
    assert (d.action, d.reason) == (Action.RELEASE, "over_quota")  # no host tier
    sc.event(5.0, "s1", K.TOOL_CALL_END, 16_000, tenant="t")
    sc.event(5.0, "s1", K.STEP_START, 16_000, tenant="t")
    set_limits(sc, "t", kv_quota_gpu_bytes=0)
    [d] = sc.event(6.0, "s1", K.TOOL_CALL_WAIT, 16_000, tenant="t", tool_name="bash")
    assert (d.action, d.reason) == (Action.RETAIN_GPU, "tool_wait")
    assert sc.tick(7.0) == []
    # a deleted tenant has no limits left either
    set_limits(sc, "t", kv_quota_gpu_bytes=1)
    assert sc.engine.delete_tenant(TenantId("t"))
    assert sc.tick(8.0) == []


def test_quota_decisions_replay_identically(script: Any) -> None:
    def run() -> list[Any]:
        sc = script(high_watermark=0.25)
        sc.worker("w1", gpu_blocks=1_400, host_blocks=300)
        tenant(sc, "a", kv_quota_gpu_bytes=300 * BLOCK, kv_quota_host_bytes=200 * BLOCK)
        tenant(sc, "b")
        for i in range(30):
            sid, tid = f"s{i % 7}", "ab"[i % 2 == 0 and i % 7 != 3]
            sid = f"{tid}{sid}"
            sc.event(i, sid, K.STEP_START, 1_600 + 160 * i, tenant=tid)
            sc.event(
                i + 0.5,
                sid,
                K.TOOL_CALL_WAIT,
                1_600 + 160 * i,
                tenant=tid,
                tool_name=f"t{i % 3}",
                expected_tool_latency_s=float(i % 4),
            )
            if i == 15:
                set_limits(sc, "a", kv_quota_gpu_bytes=100 * BLOCK)
            sc.tick(i + 0.7)
        return sc.log

    first, second = run(), run()
    assert any(d.reason == "over_quota" for d in first)
    assert first == second


# -- max_concurrent_sessions ------------------------------------------------------------------


def test_place_for_a_new_session_is_refused_at_the_session_limit(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    tenant(sc, "t", max_concurrent_sessions=2)
    tenant(sc, "other", max_concurrent_sessions=2)
    e = sc.engine
    for sid in ("s1", "s2"):
        assert e.place(req(sid, "t"), 1.0).candidates
        sc.event(1.0, sid, K.STEP_START, 1_600, tenant="t")
    with pytest.raises(TenantLimitExceeded) as ei:
        e.place(req("s3", "t"), 2.0)
    assert (ei.value.tenant_id, ei.value.limit, ei.value.current) == ("t", 2, 2)
    assert "max_concurrent_sessions" in str(ei.value) and "'t'" in str(ei.value)
    assert e.place(req("s1", "t"), 2.0).candidates  # a known session is no new one
    assert e.place(req("o1", "other"), 2.0).candidates  # other tenants are unaffected
    assert e.place(req("x1", "unknown-tenant"), 2.0).candidates  # no spec: no limit
    assert e.stats(2.0).placements_total == 5  # a refused Place is not counted
    # worker events are facts: a third session's step is recorded all the same
    sc.event(2.5, "s3", K.STEP_START, 1_600, tenant="t")
    assert e.session_view(SessionId("s3"), 2.5) is not None
    sc.event(3.0, "s1", K.SESSION_FINISH, 1_600, tenant="t")
    with pytest.raises(TenantLimitExceeded):
        e.place(req("s4", "t"), 3.0)  # s2 and s3 still live
    sc.event(3.0, "s3", K.SESSION_ABORT, 1_600, tenant="t")
    assert e.place(req("s4", "t"), 3.0).candidates  # one finished: room again
    set_limits(sc, "t", max_concurrent_sessions=1)
    with pytest.raises(TenantLimitExceeded):
        e.place(req("s4", "t"), 4.0)
    set_limits(sc, "t", max_concurrent_sessions=0)
    assert e.place(req("s4", "t"), 4.0).candidates


def test_a_refused_place_changes_nothing(script: Any) -> None:
    import pickle

    sc = script()
    sc.worker("w1")
    tenant(sc, "t", max_concurrent_sessions=1)
    sc.event(1.0, "s1", K.STEP_START, 1_600, tenant="t")
    before = pickle.dumps(sc.engine.state)
    with pytest.raises(TenantLimitExceeded):
        sc.engine.place(req("s2", "t"), 2.0)
    assert pickle.dumps(sc.engine.state) == before


# -- the counters -----------------------------------------------------------------------------


def brute_force(e: Engine) -> tuple[list[int], list[int], list[int]]:
    """Per tenant slot: live sessions, GPU bytes, host bytes, from the session arrays."""
    ss, ws = e.state.sessions, e.state.workers
    n = len(e.state.tenant_sessions)
    sessions, gpu, host = [0] * n, [0] * n, [0] * n
    for s in range(ss.high_water):
        if ss.ids[s] is None:
            continue
        t = int(ss.tenant[s])
        sessions[t] += 1
        w = int(ss.home[s])
        if w != NO_SLOT:
            bb = int(ws.block_size_tokens[w]) * int(ws.bytes_per_token[w])
            gpu[t] += int(ss.gpu_blocks[s]) * bb
            host[t] += int(ss.host_blocks[s]) * bb
    return sessions, gpu, host


WORKERS = [WorkerId(f"w{i}") for i in range(3)]
TENANTS = [TenantId(f"t{i}") for i in range(3)]
OPS = ["event"] * 6 + ["heartbeat", "tick", "tick", "quota", "cleared", "rehello", "reconcile"]
ops = st.lists(
    st.tuples(
        st.sampled_from(OPS),
        st.integers(0, 9),  # session
        st.integers(0, 2),  # worker
        st.integers(0, 6),  # choice
        st.floats(0.0, 30.0),  # time step
    ),
    min_size=1,
    max_size=80,
)


def _cache(w: int, block_tokens: int = 16) -> CacheSpec:
    return CacheSpec(block_tokens, 131_072, 400 + 300 * w, 300 * w, prefill_tokens_per_s=20_000.0)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_tenant_counters_equal_a_recount_after_any_traffic(script: list) -> None:
    e = Engine(EngineConfig(high_watermark=0.3))
    for w, wid in enumerate(WORKERS):
        e.register_worker(WorkerSpec(wid, 1, _cache(w)), 0.0)
    for i, tid in enumerate(TENANTS):
        e.create_tenant(TenantSpec(tid, kv_quota_gpu_bytes=i * 60 * BLOCK))
    epoch = [1, 1, 1]
    last: dict[str, EventKind | None] = {}
    ctx: dict[str, int] = {}
    now, seq = 0.0, 0
    for op, sess, w, choice, dt in script:
        now += dt
        wid = WORKERS[w]
        if op == "heartbeat":
            cap = int(e.state.workers.gpu_cap_blocks[w])
            e.heartbeat(wid, WorkerLoad(cap * choice // 6, 0, 1_000 * choice), now)
        elif op == "tick":
            e.tick(now)
            _check_under_quota_after_tick(e)
        elif op == "quota":
            spec = replace(
                e.get_tenant(TENANTS[sess % 3]),  # type: ignore[arg-type]
                kv_quota_gpu_bytes=choice * 40 * BLOCK,
                kv_quota_host_bytes=(choice % 3) * 40 * BLOCK,
            )
            e.update_tenant(spec)
        elif op == "cleared":
            tier = Tier.GPU if choice % 2 else Tier.HOST
            e.kv_events(wid, [KvEvent(KvEventKind.ALL_CLEARED, tier=tier)], now)
        elif op == "rehello":
            # a new epoch forgets everything; the same one may change the block size
            if choice % 2:
                epoch[w] += 1
            e.register_worker(WorkerSpec(wid, epoch[w], _cache(w, 16 * (1 + choice % 3))), now)
        elif op == "reconcile":
            sid = f"s{sess}"
            res = SessionResidency(SessionId(sid), TENANTS[sess % 3], 10 * choice, 5 * (choice % 3))
            inv = PoolInventory(100, 10, (res,), complete=choice > 3)
            e.reconcile(wid, inv, now)
            if sid not in last:
                last[sid] = K.TOOL_CALL_END  # adopted: may start a step
                ctx[sid] = 0
        else:
            sid = f"s{sess}"
            kinds = NEXT[last.get(sid)]
            kind = kinds[choice % len(kinds)]
            ctx[sid] = ctx.get(sid, 0) + 400 * choice
            seq += 1
            ev = SessionEvent(
                EventId(f"e{seq}"),
                SessionId(sid),
                TENANTS[sess % 3],
                "coder",
                0,
                kind,
                ctx[sid],
                tool_name=f"tool{choice % 3}",
                expected_tool_latency_s=float(choice),
                worker_id=wid,
                last_step=choice == 6,
            )
            ds = e.handle(ev, now)
            for d in ds.directives:
                if d.action is Action.OFFLOAD_HOST and choice == 5:
                    # the worker could not copy it out: the blocks stay on the GPU
                    e.directive_acked(
                        d.worker_id, d.directive_id, DirectiveOutcome.REJECTED, "", now
                    )
            last[sid] = None if kind in (K.SESSION_FINISH, K.SESSION_ABORT) else kind
            if last[sid] is None:
                ctx.pop(sid)
                last.pop(sid)
        sessions, gpu, host = brute_force(e)
        st_ = e.state
        assert st_.tenant_sessions == sessions
        assert st_.tenant_gpu_bytes == gpu
        assert st_.tenant_host_bytes == host
        assert sum(sessions) == len(st_.sessions)


def _check_under_quota_after_tick(e: Engine) -> None:
    """After a tick no tenant is over its GPU quota while it has an idle session on a GPU."""
    ss = e.state.sessions
    hw = ss.high_water
    for t in e.quotas.over_gpu_tenants():
        idle_on_gpu = (
            (ss.tenant[:hw] == t)
            & (ss.tier[:hw] == TIER_GPU)
            & (ss.state[:hw] != STATE_RUNNING)
            & (ss.gpu_blocks[:hw] > 0)
            & (ss.home[:hw] != NO_SLOT)
        )
        assert not idle_on_gpu.any()


def test_vectorised_victim_keys_match_the_eviction_kernel(script: Any) -> None:
    sc = script()
    sc.worker("w1", prefill_tokens_per_s=13_000.0)
    _hints = [0.5, 3.0, 40.0, 900.0]
    for i, hint in enumerate(_hints):
        sc.event(1.0, f"s{i}", K.STEP_START, 1_000 + 3_000 * i)
        sc.event(2.0, f"s{i}", K.TOOL_CALL_WAIT, 1_000 + 3_000 * i, expected_tool_latency_s=hint)
    e = sc.engine
    ss = e.state.sessions
    cand = np.array([ss.slot_of[SessionId(f"s{i}")] for i in range(len(_hints))])
    keys = e.retention.victim_keys(cand, 2.5)
    for k, s in zip(keys.tolist(), cand.tolist(), strict=True):
        want = e.kernels.victim_key(
            float(ss.next_use_s[s]),
            2.5,
            float(ss.p_continue[s]),
            int(ss.gpu_blocks[s]),
            int(ss.context_tokens[s]),
            13_000.0,
            float(e.config.knee_tokens),
            1.0,
        )
        assert k == want
