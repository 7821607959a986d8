"""The simulator's session-granular pool against the reference BlockPool.

DESIGN §1.6: the simulator may run a faster form of the reference pool's rules
if one trace through both gives the same hits and evictions. Steps run one at
a time with block-aligned token counts (the reference caches full blocks only).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched_client.pool import BlockPool
from loadtest.sim.cluster import Pool

BS = 16


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(1, 3)),
        min_size=1,
        max_size=40,
    ),
    st.integers(24, 64),
)
def test_same_hits_and_residency_as_the_reference_pool(
    steps: list[tuple[int, int, int]], capacity_blocks: int
) -> None:
    ref = BlockPool(gpu_capacity_blocks=capacity_blocks, block_size_tokens=BS, kv_events=False)
    sim = Pool(capacity_blocks)
    tokens: dict[int, int] = {}  # session -> context tokens so far
    for s, add_blocks, out_blocks in steps:
        prompt = tokens.get(s, 0) + add_blocks * BS
        out = out_blocks * BS
        if (prompt + out) // BS > capacity_blocks // 2:
            continue  # keep every step allocatable in both
        ids = [s * 1_000_000 + i for i in range(prompt + out)]
        alloc = ref.start_step(f"s{s}", "t", ids[:prompt], 0.0)
        ref.end_step(f"s{s}", 0.0, ids[prompt:])
        have = sim.gpu.get(s, 0)
        need = (prompt + out) // BS
        sim.evict_lru(need - have, exclude=s)
        sim.hold(s, need)
        sim.idle(s)
        assert alloc.gpu_hit_tokens == min(have * BS, prompt)
        tokens[s] = prompt + out
        # every session holds the same number of GPU blocks (a prefix) in both pools
        held = {r.session_id: r.gpu_blocks for r in ref.snapshot(0.0).sessions}
        for k in tokens:
            assert held.get(f"s{k}", 0) == sim.gpu.get(k, 0), (k, held, sim.gpu)
    assert ref.gpu_used_blocks() == sim.used
