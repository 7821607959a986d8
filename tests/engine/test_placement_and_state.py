"""Placement: affinity, work stealing, bin-packing; state: slots, growth, residency lists."""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler_service.domain import EventKind, PlaceRequest, SessionId, TenantId, Tier, WorkerId
from scheduler_service.state import NO_SLOT, ClusterState

K = EventKind


def _req(sid: str, ctx: int, **kw: Any) -> PlaceRequest:
    return PlaceRequest(SessionId(sid), TenantId("t1"), "coder", 1, ctx, **kw)


def test_affinity_puts_the_home_first_with_its_cached_tokens(script: Any) -> None:
    sc = script()
    for w in ("w1", "w2", "w3"):
        sc.worker(w)
    sc.event(1.0, "s1", K.STEP_START, 16_000, worker="w2")
    p = sc.engine.place(_req("s1", 16_500), 2.0)
    assert p.reason == "affinity"
    home, *rest = p.candidates
    assert (home.worker_id, home.expected_cached_tokens, home.cached_tier) == (
        "w2",
        16_000,
        Tier.GPU,
    )
    assert [c.worker_id for c in rest] == ["w1", "w3"]  # equal scores: lower slot first
    assert all(c.expected_cached_tokens == 0 for c in rest)
    assert home.score > rest[0].score
    assert p.affinity_ttl_s == 30.0


def test_an_overloaded_home_loses_the_step_when_waiting_costs_more_than_rebuilding(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1")
    sc.worker("w2")
    sc.event(1.0, "s1", K.STEP_START, 16_000, worker="w1")
    # rebuilding 16k tokens costs ~1 s; a 0.5 s queue is worth waiting for ...
    sc.heartbeat(2.0, "w1", free_blocks=9_000, queued=10_000)
    assert sc.engine.place(_req("s1", 16_000), 2.0).candidates[0].worker_id == "w1"
    # ... a 5 s queue is not: the idle worker steals the step
    sc.heartbeat(3.0, "w1", free_blocks=9_000, queued=100_000)
    p = sc.engine.place(_req("s1", 16_000), 3.0)
    assert (p.reason, [c.worker_id for c in p.candidates]) == ("steal", ["w2", "w1"])


def test_a_step_leaving_its_home_for_a_peer_of_its_transfer_domain_loads_the_kv(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1", kv_domain="node-a")
    sc.worker("w2", kv_domain="node-a")
    sc.worker("w3", kv_domain="node-b")
    sc.event(1.0, "s1", K.STEP_START, 64_000, worker="w1")
    sc.heartbeat(3.0, "w1", free_blocks=5_000, queued=400_000)  # a 20 s queue: leave
    p = sc.engine.place(_req("s1", 64_000), 3.0)
    assert p.reason == "move"
    by_id = {c.worker_id: c for c in p.candidates}
    assert [c.worker_id for c in p.candidates] == ["w2", "w3", "w1"]
    # w2 loads the 64k tokens from w1 (8 GiB out of w1's GPU and into w2's over
    # 25 GB/s links, ~0.7 s) instead of prefilling them (~5 s)
    assert (by_id["w2"].kv_source_worker_id, by_id["w2"].cached_tier) == ("w1", Tier.NONE)
    assert by_id["w2"].expected_cached_tokens == 64_000
    assert by_id["w2"].score == by_id["w3"].score  # ranked as rebuilds: the load is no credit
    # w3 is in another domain: it would rebuild
    assert (by_id["w3"].kv_source_worker_id, by_id["w3"].expected_cached_tokens) == (None, 0)
    assert (by_id["w1"].kv_source_worker_id, by_id["w1"].cached_tier) == (None, Tier.GPU)
    # the step starts on w2: the engine lets w1's copy go (RELEASE, moved)
    out = sc.event(4.0, "s1", K.STEP_START, 64_000, worker="w2")
    assert [(d.action.name, d.worker_id, d.reason) for d in out] == [("RELEASE", "w1", "moved")]
    assert sc.engine.session_view(SessionId("s1"), 4.0).home_worker_id == "w2"  # type: ignore[union-attr]


def test_a_draining_home_hands_its_kv_over_and_a_gone_one_cannot(script: Any) -> None:
    sc = script()
    sc.worker("w1", kv_domain="node-a")
    sc.worker("w2", kv_domain="node-a")
    sc.event(1.0, "s1", K.STEP_START, 64_000, worker="w1")
    sc.engine.drain_worker(WorkerId("w1"), 2.0)
    p = sc.engine.place(_req("s1", 64_000), 2.0)
    assert (p.reason, p.candidates[0].worker_id, p.candidates[0].kv_source_worker_id) == (
        "move",
        "w2",
        "w1",
    )
    sc.engine.worker_disconnected(WorkerId("w1"), 3.0)
    p = sc.engine.place(_req("s1", 64_000), 3.0)
    first = p.candidates[0]
    assert (first.worker_id, first.kv_source_worker_id, first.expected_cached_tokens) == (
        "w2",
        None,
        0,
    )


def test_the_transfer_domain_does_not_change_where_a_step_goes(script: Any) -> None:
    # the move is decided as if the step rebuilt its KV wherever it went: the
    # lower slot of two idle workers wins, though only the other could load the KV
    sc = script()
    sc.worker("w1", kv_domain="node-a")
    sc.worker("w2", kv_domain="node-b")
    sc.worker("w3", kv_domain="node-a")
    sc.event(1.0, "s1", K.STEP_START, 64_000, worker="w1")
    sc.heartbeat(3.0, "w1", free_blocks=5_000, queued=400_000)
    p = sc.engine.place(_req("s1", 64_000), 3.0)
    assert (p.reason, [c.worker_id for c in p.candidates]) == ("steal", ["w2", "w3", "w1"])
    assert [c.kv_source_worker_id for c in p.candidates] == [None, "w1", None]
    # a calmer home keeps the step, domain or not
    sc.heartbeat(4.0, "w1", free_blocks=5_000, queued=10_000)
    assert sc.engine.place(_req("s1", 64_000), 4.0).reason == "affinity"


def test_without_a_shared_domain_the_overloaded_home_loses_the_step_to_a_rebuild(
    script: Any,
) -> None:
    sc = script()
    sc.worker("w1")
    sc.worker("w3")
    sc.event(1.0, "s1", K.STEP_START, 64_000, worker="w1")
    sc.heartbeat(3.0, "w1", free_blocks=5_000, queued=400_000)  # a 20 s queue
    p = sc.engine.place(_req("s1", 64_000), 3.0)
    assert p.reason == "steal"
    assert (p.candidates[0].worker_id, p.candidates[0].kv_source_worker_id) == ("w3", None)
    assert p.candidates[0].expected_cached_tokens == 0


def test_new_sessions_bin_pack_into_the_tightest_fit(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=1_000)
    sc.worker("w2", gpu_blocks=1_000)
    sc.worker("w3", gpu_blocks=1_000)
    sc.event(1.0, "a", K.STEP_START, 8_000, worker="w1")  # 500 blocks used
    sc.event(1.0, "b", K.STEP_START, 14_400, worker="w3")  # 900 blocks used
    # 200 blocks fit w1 (slack 300) and w2 (slack 800), not w3: the tightest fit wins
    p = sc.engine.place(_req("new", 3_200), 2.0)
    assert p.reason == "bin_pack"
    assert [c.worker_id for c in p.candidates] == ["w1", "w2", "w3"]
    # a restricted candidate list is honoured, unknown ids are ignored
    p = sc.engine.place(
        _req("new", 3_200, candidate_worker_ids=(WorkerId("w3"), WorkerId("zz"))), 2.0
    )
    assert [c.worker_id for c in p.candidates] == ["w3"]
    # w1 reports its queue (the first step sent there is in it, and has run)
    sc.heartbeat(2.0, "w1", free_blocks=500)
    assert [
        c.worker_id for c in sc.engine.place(_req("new", 3_200, max_candidates=1), 2.0).candidates
    ] == ["w1"]


def test_place_counts_what_it_sent_until_the_worker_reports_its_queue(script: Any) -> None:
    sc = script()
    for w in ("w1", "w2", "w3"):
        sc.worker(w)
    # 3 new sessions between two heartbeats: the reported queues are all empty,
    # but each Place counts the prefill it sent, so the steps spread out
    # instead of piling onto the first worker
    firsts = [
        sc.engine.place(_req(f"n{i}", 30_000, max_candidates=1), 1.0).candidates[0].worker_id
        for i in range(3)
    ]
    assert firsts == ["w1", "w2", "w3"]
    # a heartbeat replaces the tally with the worker's own figure
    sc.heartbeat(1.5, "w2", free_blocks=10_000, queued=0)
    assert sc.engine.place(_req("n3", 30_000), 1.5).candidates[0].worker_id == "w2"
    sc.heartbeat(1.6, "w1", free_blocks=10_000, queued=0)
    sc.heartbeat(1.6, "w3", free_blocks=10_000, queued=0)
    # w2 still counts n3's 30k tokens; w1 and w3 start afresh: lowest slot first
    assert [c.worker_id for c in sc.engine.place(_req("n4", 30_000), 1.6).candidates] == [
        "w1",
        "w3",
        "w2",
    ]


def test_place_changes_no_decision_state(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    before = [
        getattr(sc.engine.state.workers, n).copy() for n, _d, _f in sc.engine.state.workers._fields
    ]
    for _ in range(5):
        sc.engine.place(_req("s1", 16_000), 2.0)
    after = [getattr(sc.engine.state.workers, n) for n, _d, _f in sc.engine.state.workers._fields]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert sc.engine.stats(2.0).placements_total == 5


def test_slots_are_reused_and_arrays_double() -> None:
    st = ClusterState(worker_capacity=2, session_capacity=2)
    w = st.workers.add(WorkerId("w"))
    slots = [st.sessions.add(SessionId(f"s{i}")) for i in range(5)]
    assert slots == [0, 1, 2, 3, 4]
    assert st.sessions.capacity == 8 and st.sessions.tier.shape == (8,)
    st.sessions.context_tokens[3] = 77
    assert st.sessions.remove(SessionId("s3")) == 3
    assert st.sessions.context_tokens[3] == 0  # fields reset on release
    assert st.sessions.add(SessionId("s5")) == 3  # the freed slot comes back first
    assert len(st.sessions) == 5 and st.sessions.high_water == 5
    for s in (0, 2, 4):
        st.link(s, w)
    assert st.residents_of(w) == [4, 2, 0]
    st.unlink(2)
    assert st.residents_of(w) == [4, 0] and st.workers.residents[w] == 2
    assert st.sessions.home[2] == NO_SLOT


def test_state_for_100k_sessions_and_1024_workers_fits_the_budget() -> None:
    st = ClusterState(worker_capacity=1_024, session_capacity=131_072)
    # the arrays: under 200 B a slot, a small part of the 2 KB per session and
    # 200 MB in all (the rest of the budget is the id dicts)
    assert st.sessions.nbytes() / st.sessions.capacity < 200
    assert st.nbytes() < 32 * 2**20


def test_session_fields_live_in_one_buffer_through_growth_and_a_snapshot() -> None:
    import pickle

    from scheduler_service.state import SessionTable

    t = SessionTable(capacity=4)
    for i in range(9):  # grows 4 -> 8 -> 16
        s = t.add(SessionId(f"s{i}"))
        t.context_tokens_v[s] = 100 + i
        t.p_continue_v[s] = 0.5
    for table in (t, pickle.loads(pickle.dumps(t))):
        arrays = [getattr(table, name) for name, _d, _f in table._fields]
        assert len({id(a.base) for a in arrays}) == 1  # one buffer
        assert all(a.flags.aligned and a.flags.c_contiguous for a in arrays)
        assert all(a.ctypes.data % 64 == 0 for a in arrays)  # each on a cache line
        assert table.context_tokens[:9].tolist() == [100 + i for i in range(9)]
        # slots not handed out yet hold the defaults
        assert table.p_continue[9:].tolist() == [1.0] * 7
        assert (table.home[9:] == NO_SLOT).all() and np.isinf(table.timer_due_s[9:]).all()
        table.context_tokens_v[0] = 7  # the views write the arrays
        assert table.context_tokens[0] == 7
