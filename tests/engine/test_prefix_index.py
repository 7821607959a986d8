"""The prefix index: KV events in, longest cached run of a prompt's blocks out; Place uses it."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.domain import (
    KvEvent,
    KvEventKind,
    PlaceRequest,
    SessionId,
    TenantId,
    Tier,
    WorkerId,
)
from scheduler_service.prefix_index import PrefixIndex

STORED, REMOVED, CLEARED = KvEventKind.STORED, KvEventKind.REMOVED, KvEventKind.ALL_CLEARED


def _runs(index: PrefixIndex, hashes: list[int], n: int = 8) -> dict[int, int]:
    out = np.zeros(n, dtype=np.int64)
    touched = index.prefix_blocks(hashes, out)
    got = {w: int(out[w]) for w in touched}
    assert sorted(got) == sorted(set(touched))
    assert int(out.sum()) == sum(got.values())  # nothing written outside ``touched``
    return got


def test_the_longest_unbroken_run_from_the_first_block_counts() -> None:
    ix = PrefixIndex()
    ix.apply(0, [KvEvent(STORED, (1, 2, 3, 4))])
    ix.apply(1, [KvEvent(STORED, (1, 2)), KvEvent(STORED, (4,))])  # 3 missing: the run stops
    ix.apply(2, [KvEvent(STORED, (2, 3, 4))])  # no first block: no run at all
    assert _runs(ix, [1, 2, 3, 4, 5]) == {0: 4, 1: 2}
    ix.apply(0, [KvEvent(REMOVED, (3,))])
    assert _runs(ix, [1, 2, 3, 4]) == {0: 2, 1: 2}
    assert _runs(ix, [9, 1]) == {}
    assert _runs(ix, []) == {}


def test_host_tier_and_other_groups_are_not_gpu_hits_and_clearing_forgets_a_worker() -> None:
    ix = PrefixIndex()
    ix.apply(0, [KvEvent(STORED, (1, 2), tier=Tier.HOST)])
    ix.apply(0, [KvEvent(STORED, (1, 2), group_index=1)])
    assert _runs(ix, [1, 2]) == {} and len(ix) == 0
    ix.apply(0, [KvEvent(STORED, (1, 2))])
    ix.apply(3, [KvEvent(STORED, (1, 2, 3))])
    ix.apply(0, [KvEvent(CLEARED)])
    assert _runs(ix, [1, 2, 3]) == {3: 3}
    ix.forget_worker(3)
    assert len(ix) == 0


def test_the_index_is_bounded_and_drops_the_least_recently_stored() -> None:
    ix = PrefixIndex(max_blocks=4)
    ix.apply(0, [KvEvent(STORED, (1, 2, 3))])
    ix.apply(1, [KvEvent(STORED, (1,))])  # re-stored: 1 is now the most recent
    ix.apply(1, [KvEvent(STORED, (7, 8))])
    assert len(ix) == 4
    assert _runs(ix, [1, 3]) == {0: 2, 1: 1}  # 2 went first
    assert _runs(ix, [1, 2]) == {0: 1, 1: 1}


events = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.sampled_from([STORED, STORED, REMOVED, CLEARED]),
        st.lists(st.integers(0, 12), max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(events, st.lists(st.integers(0, 12), max_size=8))
def test_an_unbounded_index_agrees_with_per_worker_sets(
    evs: list[tuple[int, KvEventKind, list[int]]], query: list[int]
) -> None:
    ix = PrefixIndex()
    held: dict[int, set[int]] = {w: set() for w in range(6)}
    for w, kind, hs in evs:
        ix.apply(w, [KvEvent(kind, tuple(hs))])
        if kind is STORED:
            held[w] |= set(hs)
        elif kind is REMOVED:
            held[w] -= set(hs)
        else:
            held[w].clear()
    want = {}
    for w, blocks in held.items():
        run = 0
        while run < len(query) and query[run] in blocks:
            run += 1
        if run:
            want[w] = run
    assert _runs(ix, query) == want


def _place(sc: Any, sid: str, hashes: tuple[int, ...], now: float, **kw: Any) -> Any:
    req = PlaceRequest(
        SessionId(sid), TenantId("t1"), "coder", 0, 16_000, prefix_block_hashes=hashes, **kw
    )
    return sc.engine.place(req, now)


def test_place_sends_a_new_session_to_the_worker_holding_its_prompt_prefix(script: Any) -> None:
    sc = script()
    for w in ("w1", "w2", "w3"):
        sc.worker(w)
    system_prompt = tuple(range(1000, 1500))  # 500 blocks of 16 tokens: 8,000 tokens
    sc.engine.kv_events(WorkerId("w2"), [KvEvent(STORED, system_prompt)], 1.0)
    sc.engine.kv_events(WorkerId("w3"), [KvEvent(STORED, system_prompt[:100])], 1.0)
    sc.heartbeat(1.0, "w2", free_blocks=9_000)
    sc.heartbeat(1.0, "w3", free_blocks=9_000)
    p = _place(sc, "new", (*system_prompt, 1, 2, 3), 2.0)
    assert p.reason == "prefix"
    assert [(c.worker_id, c.expected_cached_tokens, c.cached_tier) for c in p.candidates] == [
        ("w2", 8_000, Tier.GPU),
        ("w3", 1_600, Tier.GPU),
        ("w1", 0, Tier.NONE),
    ]
    # without hashes the same request is plain bin-packing
    assert _place(sc, "new2", (), 2.0).reason == "bin_pack"
    # a prefix is worth its prefill saved, not more: 5 s of queue outweighs it
    sc.heartbeat(3.0, "w1", free_blocks=10_000)
    sc.heartbeat(3.0, "w2", free_blocks=9_000, queued=100_000)
    sc.heartbeat(3.0, "w3", free_blocks=9_000)
    p = _place(sc, "new3", system_prompt, 3.0)
    assert p.candidates[0].worker_id == "w3"
    # a restarted worker holds nothing, whatever it stored before
    sc.worker("w3", epoch=2, now=4.0)
    p = _place(sc, "new4", system_prompt, 4.0, max_candidates=3)
    assert all(c.expected_cached_tokens == 0 for c in p.candidates if c.worker_id == "w3")


def test_a_pickled_index_keeps_its_bound_and_none_of_its_blocks() -> None:
    import pickle

    ix = PrefixIndex(max_blocks=7)
    ix.apply(0, [KvEvent(STORED, (1, 2))])
    back = pickle.loads(pickle.dumps(ix))
    assert (back.max_blocks, len(back)) == (7, 0)
    back.apply(1, [KvEvent(STORED, (1,))])
    assert _runs(back, [1, 2]) == {1: 1}
