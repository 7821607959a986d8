"""Reference BlockPool: exact eviction orders, leases, tiers, events and snapshots."""

from __future__ import annotations

import pytest

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.kv_blocks import chain_hashes
from kvsched_client.pool import BlockPool, PoolExhaustedError

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def h(tenant: str, tokens: list[int]) -> list[bytes]:
    return chain_hashes(tokens, BS, None, tenant)


def kinds(events: list[types_pb2.KvEvent]) -> list[tuple[str, int, list[bytes]]]:
    out = []
    for ev in events:
        body = getattr(ev, ev.WhichOneof("event"))
        out.append((ev.WhichOneof("event"), body.tier, [x.digest for x in body.block_hashes]))
    return out


def directive(sid: str, action: int, ttl_s: float = 0.0, priority: int = 0):
    return worker_pb2.RetentionDirective(
        directive_id="d", session_id=sid, action=action, lease_ttl_s=ttl_s, priority=priority
    )


def test_free_queue_evicts_lru_and_the_tail_of_a_prefix_first() -> None:
    pool = BlockPool(gpu_capacity_blocks=5, block_size_tokens=BS)
    a = toks(0, 12)
    alloc = pool.start_step("A", "t", a, now=0.0)
    assert (alloc.gpu_hit_tokens, alloc.computed_tokens) == (0, 12)
    ha = h("t", a)
    assert kinds(pool.take_kv_events()) == [("stored", types_pb2.TIER_GPU, ha)]
    pool.end_step("A", now=1.0)
    # Unused blocks first, then A's blocks tail-first: 2 before 1 before 0.
    assert pool.free_queue() == [3, 4, 2, 1, 0]
    b = toks(100, 16)
    pool.start_step("B", "t", b, now=2.0)
    # B needed 4 blocks: 3, 4 (empty), then A's tail (2) and middle (1).
    ev = kinds(pool.take_kv_events())
    assert ev == [
        ("removed", types_pb2.TIER_GPU, [ha[2], ha[1]]),  # adjacent removals share an event
        ("stored", types_pb2.TIER_GPU, h("t", b)),
    ]
    assert pool.free_queue() == [0]
    pool.end_step("B", now=3.0)
    # A's root block survived and is a prefix hit for A's next step.
    alloc = pool.start_step("A", "t", a + toks(50, 2), now=4.0)
    assert (alloc.gpu_hit_tokens, alloc.host_hit_tokens, alloc.computed_tokens) == (4, 0, 10)
    pool.check_invariants()


def test_prefix_is_shared_within_a_tenant_and_isolated_across_tenants() -> None:
    pool = BlockPool(gpu_capacity_blocks=16, block_size_tokens=BS)
    system = toks(0, 8)
    pool.start_step("A", "t1", [*system, 1, 2, 3, 4], now=0.0)
    assert pool.start_step("B", "t1", [*system, 9], now=0.0).gpu_hit_tokens == 8
    assert pool.start_step("C", "t2", [*system, 9], now=0.0).gpu_hit_tokens == 0
    assert pool.held_blocks() == 3 + 1 + 3  # A: 3; B: its own tail; C: 3
    pool.check_invariants()


def test_partial_block_is_not_cached_until_decode_fills_it() -> None:
    pool = BlockPool(gpu_capacity_blocks=8, block_size_tokens=BS)
    pool.start_step("A", "t", toks(0, 6), now=0.0)
    pool.take_kv_events()
    pool.end_step("A", now=1.0, generated_token_ids=[6, 7, 8])
    full = h("t", toks(0, 9))
    assert kinds(pool.take_kv_events()) == [("stored", types_pb2.TIER_GPU, [full[1]])]
    assert pool.start_step("A", "t", [*toks(0, 9), 10], now=2.0).gpu_hit_tokens == 8


def test_lease_holds_blocks_past_step_end_until_ttl() -> None:
    pool = BlockPool(gpu_capacity_blocks=4, block_size_tokens=BS)
    pool.start_step("A", "t", toks(0, 8), now=0.0)
    assert pool.apply_directive(directive("A", worker_pb2.RETAIN_GPU, 5.0), now=0.5).ok
    pool.end_step("A", now=1.0)
    assert pool.held_blocks() == 2
    assert pool.residency("A", now=2.0).lease_remaining_s == pytest.approx(3.5)
    # B fits in the 2 unleased blocks: A's lease is untouched.
    pool.start_step("B", "t", toks(100, 8), now=2.0)
    pool.end_step("B", now=2.5)
    assert pool.stats.leases_broken == 0
    assert pool.expire_leases(now=5.49) == 0
    assert pool.expire_leases(now=5.5) == 1
    assert pool.held_blocks() == 0
    # Released blocks go to the MRU end, tail first.
    ids = pool.free_queue()
    assert ids[-2:] == [1, 0]
    pool.check_invariants()


def test_retain_after_step_end_takes_back_the_cached_prefix() -> None:
    pool = BlockPool(gpu_capacity_blocks=8, block_size_tokens=BS)
    pool.start_step("A", "t", toks(0, 10), now=0.0)
    pool.end_step("A", now=1.0)
    assert pool.held_blocks() == 0
    assert pool.retain("A", 3.0, 0, now=1.1).ok
    assert pool.held_blocks() == 2  # two full cached blocks; the partial tail was freed
    assert pool.residency("A", now=1.1).gpu_blocks == 2


def test_exhaustion_breaks_the_lowest_priority_lease_first() -> None:
    pool = BlockPool(gpu_capacity_blocks=4, block_size_tokens=BS)
    for sid, prio in (("A", 5), ("B", 1)):
        pool.start_step(sid, sid, toks(0, 8), now=0.0)
        pool.retain(sid, 60.0, prio, now=0.0)
        pool.end_step(sid, now=0.1)
    pool.start_step("C", "C", toks(0, 4), now=1.0)
    assert pool.stats.leases_broken == 1
    assert pool.residency("A", 1.0).lease_remaining_s > 0
    assert pool.residency("B", 1.0).lease_remaining_s == 0
    with pytest.raises(PoolExhaustedError):
        pool.start_step("D", "D", toks(0, 16), now=1.0)  # C runs, nothing else to break
    pool.check_invariants()


def test_offload_moves_blocks_to_host_and_prefetch_brings_them_back() -> None:
    bpt = 1000
    pool = BlockPool(
        gpu_capacity_blocks=4,
        block_size_tokens=BS,
        host_capacity_blocks=4,
        bytes_per_token=bpt,
        host_link_bytes_per_s=8000.0,
    )
    a = toks(0, 8)
    ha = h("t", a)
    pool.start_step("A", "t", a, now=0.0)
    pool.end_step("A", now=1.0)
    pool.take_kv_events()
    res = pool.apply_directive(directive("A", worker_pb2.OFFLOAD_HOST), now=2.0)
    assert res.ok and res.ready_s == pytest.approx(2.0 + 2 * BS * bpt / 8000.0)
    events = pool.take_kv_events()
    assert kinds(events) == [
        ("removed", types_pb2.TIER_GPU, ha),
        ("stored", types_pb2.TIER_HOST, ha),
    ]
    assert not events[1].stored.HasField("parent_block_hash")  # the run starts at the root
    r = pool.residency("A", now=2.0)
    assert (r.gpu_blocks, r.host_blocks, r.cached_tokens) == (0, 2, 8)
    assert pool.gpu_used_blocks() == 0
    # Offloaded blocks are reused first.
    assert pool.free_queue()[:2] == [1, 0]
    res = pool.apply_directive(directive("A", worker_pb2.PREFETCH_GPU, ttl_s=10.0), now=10.0)
    assert res.ok and res.ready_s == pytest.approx(11.0)
    r = pool.residency("A", now=10.0)
    assert (r.gpu_blocks, r.host_blocks, r.lease_remaining_s) == (2, 0, 10.0)
    alloc = pool.start_step("A", "t", [*a, 1], now=12.0)
    assert (alloc.gpu_hit_tokens, alloc.computed_tokens) == (8, 1)
    pool.check_invariants()


def test_step_start_reloads_host_hits_with_link_time() -> None:
    pool = BlockPool(
        gpu_capacity_blocks=4,
        block_size_tokens=BS,
        host_capacity_blocks=4,
        bytes_per_token=1000,
        host_link_bytes_per_s=4000.0,
    )
    pool.start_step("A", "t", toks(0, 8), now=0.0)
    pool.end_step("A", now=0.0)
    pool.offload("A", now=0.0)  # d2h link busy until 2.0; h2d is separate
    alloc = pool.start_step("A", "t", toks(0, 10), now=1.0)
    assert (alloc.gpu_hit_tokens, alloc.host_hit_tokens, alloc.computed_tokens) == (0, 8, 2)
    assert alloc.ready_s == pytest.approx(3.0)
    pool.check_invariants()


def test_evict_now_and_release() -> None:
    pool = BlockPool(gpu_capacity_blocks=8, block_size_tokens=BS, host_capacity_blocks=2)
    pool.start_step("A", "t", toks(0, 8), now=0.0)
    pool.retain("A", 10.0, 0, now=0.0)
    pool.end_step("A", now=0.0)
    assert pool.release("A", now=1.0).ok
    assert pool.held_blocks() == 0 and pool.gpu_used_blocks() == 2  # still cached
    pool.take_kv_events()
    assert pool.apply_directive(directive("A", worker_pb2.EVICT_NOW), now=2.0).ok
    assert kinds(pool.take_kv_events()) == [("removed", types_pb2.TIER_GPU, h("t", toks(0, 8)))]
    assert pool.gpu_used_blocks() == 0
    assert pool.apply_directive(directive("nobody", worker_pb2.RELEASE), now=2.0).ok


@pytest.mark.parametrize(
    ("action", "ttl", "reason"),
    [
        (worker_pb2.RETAIN_GPU, 0.0, "RETAIN_GPU needs lease_ttl_s > 0"),
        (worker_pb2.OFFLOAD_HOST, 0.0, "no host tier"),
        (worker_pb2.RETAIN_GPU, 1.0, "unknown session"),
    ],
)
def test_rejections_say_why(action: int, ttl: float, reason: str) -> None:
    pool = BlockPool(gpu_capacity_blocks=4, block_size_tokens=BS)
    sid = "ghost" if reason == "unknown session" else "A"
    pool.start_step("A", "t", toks(0, 4), now=0.0)
    pool.end_step("A", now=0.0)
    res = pool.apply_directive(directive(sid, action, ttl), now=1.0)
    assert res.outcome == worker_pb2.DIRECTIVE_REJECTED and res.reason == reason


def test_snapshot_and_heartbeat() -> None:
    pool = BlockPool(gpu_capacity_blocks=8, block_size_tokens=BS, host_capacity_blocks=4)
    pool.start_step("A", "ta", toks(0, 6), now=0.0)
    pool.start_step("B", "tb", toks(0, 4), now=0.0)
    pool.end_step("B", now=0.0)
    snap = pool.snapshot(now=1.0)
    assert snap.complete and snap.gpu_used_blocks == 3 and snap.host_used_blocks == 0
    by = {s.session_id: s for s in snap.sessions}
    assert (by["A"].tenant_id, by["A"].gpu_blocks, by["A"].cached_tokens) == ("ta", 2, 6)
    assert (by["B"].gpu_blocks, by["B"].cached_tokens) == (1, 4)
    hb = pool.heartbeat(now=1.0)
    assert (hb.gpu_free_blocks, hb.host_free_blocks, hb.running_steps) == (6, 4, 1)


def test_a_block_refilled_on_gpu_leaves_the_host_tier() -> None:
    # Found by the state machine: decode fills a block whose hash is still on host.
    pool = BlockPool(gpu_capacity_blocks=8, block_size_tokens=BS, host_capacity_blocks=8)
    prompt = [7, 7, 7, 7, 4, 5, 6]
    pool.start_step("a", "t", prompt, now=0.0)
    pool.end_step("a", now=0.0, generated_token_ids=[900])
    assert pool.offload("a", now=0.0).ok
    pool.finish_session("a", now=0.0)
    pool.start_step("b", "t", prompt, now=1.0)
    pool.end_step("b", now=1.0, generated_token_ids=[900])
    pool.check_invariants()
    r = pool.residency("b", now=1.0)
    assert (r.gpu_blocks, r.host_blocks) == (2, 0)
