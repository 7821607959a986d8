"""Each baseline's defining behaviour, on the pool and on scripted sessions."""

from __future__ import annotations

from loadtest.sim.cluster import Pool
from loadtest.sim.policies import Clairvoyant, LlmdPrefix, RoundRobinLru, TtlPin, VllmApc

from .conftest import session, tiny_sim


def test_pool_evicts_lru_session_tail_first_and_keeps_its_prefix() -> None:
    p = Pool(30)
    for s in (1, 2):
        p.hold(s, 10)
        p.idle(s)
    p.evict_lru(15)  # 10 free, 5 more needed
    assert p.gpu == {1: 5, 2: 10}  # the LRU session lost its last 5 blocks, kept its prefix
    assert list(p.lru) == [1, 2]  # and stays first in line
    p.evict_lru(22)
    assert p.gpu == {2: 8}
    assert p.evicted_blocks == 12


def test_pool_never_evicts_running_or_leased_blocks() -> None:
    p = Pool(30)
    p.hold(1, 10)  # running
    p.hold(2, 10)
    p.lease(2, 5.0)
    p.hold(3, 5)
    p.idle(3)
    p.evict_lru(30)
    assert p.gpu == {1: 10, 2: 10}


def test_vllm_apc_keeps_a_finished_steps_blocks_until_pressure() -> None:
    # a: one step of 480+320 tokens = 50 blocks; b arrives later and fits beside it
    a = session("a", 0.0, [480], [320], [])
    b = session("b", 20.0, [480], [320], [])
    sim = tiny_sim([a, b], VllmApc(), capacity_blocks=120)
    sim.run()
    pool = sim.replicas[0].pool
    assert pool.gpu == {0: 50, 1: 50}  # both kept: no pressure
    # with room for only one more session, b takes the tail of a (LRU) only
    sim = tiny_sim(
        [session("a", 0.0, [480], [320], []), session("b", 20.0, [480], [320], [])],
        VllmApc(),
        capacity_blocks=80,
    )
    sim.run()
    assert sim.replicas[0].pool.gpu == {0: 30, 1: 50}


def test_vllm_apc_affinity_reuses_the_cache_across_a_tool_call() -> None:
    a = session("a", 0.0, [1600, 160], [160, 16], [1.0])
    sim = tiny_sim([a], VllmApc(), gpus=4, capacity_blocks=1000)
    rec = sim.run()
    # step 1 prompt = 1600 + 160 + 160 = 1920 tokens, 1760 of them cached
    assert rec.prompt_tokens == 1600 + 1920
    assert rec.hit_tokens == 1760
    assert rec.recompute_s == 0.0


def test_rr_lru_rotates_replicas_and_recomputes_after_a_tool_call() -> None:
    a = session("a", 0.0, [1600, 160, 160], [160, 16, 16], [1.0, 1.0])
    sim = tiny_sim([a], RoundRobinLru(), gpus=4, capacity_blocks=1000)
    rec = sim.run()
    assert [len(t) for t in rec.trace] == [1, 1, 1, 0]
    assert rec.hit_tokens == 0
    assert rec.recompute_s > 0.0


def test_ttl_pin_holds_through_a_tool_call_until_the_ttl() -> None:
    # a waits 20 s on its tool; the first TTL for an unseen tool is 5 s.
    # b (arrives at 8 s) needs all the memory: it cannot evict a before the lease ends.
    a = session("a", 0.0, [480, 16], [320, 16], [20.0])
    sim = tiny_sim([a], TtlPin(), capacity_blocks=100)
    sim.duration_s = 3.0
    sim.run()
    pool = sim.replicas[0].pool
    assert 0 in pool.lease_until and 0 not in pool.lru
    until = pool.lease_until[0]
    b = session("b", 4.0, [1200], [80], [])
    sim = tiny_sim([a, b], TtlPin(), capacity_blocks=100)
    rec_b_admitted = []
    orig = sim._admit

    def spy(sid: int, r: int, prompt: int, need: int) -> None:
        if sid == 1:
            rec_b_admitted.append(sim.now)
        orig(sid, r, prompt, need)

    sim._admit = spy  # type: ignore[method-assign]
    sim.run()
    assert rec_b_admitted == [until]  # b waited for the lease to end, then evicted a
    step_end_s = until - 5.0  # the pin of a tool never seen before lasts 5 s
    assert 0.0 < step_end_s < 4.0


def test_llmd_prefix_follows_the_cached_prefix() -> None:
    a = session("a", 0.0, [1600, 160, 160], [160, 16, 16], [1.0, 1.0])
    sim = tiny_sim([a], LlmdPrefix(), gpus=4, capacity_blocks=1000)
    rec = sim.run()
    assert sum(1 for t in rec.trace if t) == 1  # every step on the replica holding its prefix
    assert rec.hit_tokens == 1760 + 1936


def test_clairvoyant_eviction_keeps_the_session_used_soonest() -> None:
    # a returns after 5 s, b after 50 s; c needs room at 2 s: b is evicted, not a (LRU would)
    a = session("a", 0.0, [320, 16], [160, 16], [5.0])
    b = session("b", 0.1, [320, 16], [160, 16], [50.0])
    c = session("c", 2.0, [640], [160], [])
    sim = tiny_sim([a, b, c], Clairvoyant(), capacity_blocks=90)
    sim.duration_s = 3.0
    sim.run()
    # c takes 50 blocks with 30 free: 20 come from b's tail
    assert sim.replicas[0].pool.gpu[0] == 30  # a intact
    assert sim.replicas[0].pool.gpu.get(1, 0) == 10  # b lost its tail
