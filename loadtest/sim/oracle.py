"""Cache replays: LRU and offline Bélády (farthest next use) over a fixed trace.

Two forms of trace:

* block traces (Mooncake style): each request lists the block ids it uses, in
  order; every id is a unit object. ``replay_blocks`` is classic demand paging:
  a missed block is loaded, and when the cache is over capacity one resident
  block (not the one just used) goes: the least recently used one, or under
  Bélády the one used farthest in the future (MIN, optimal for unit objects).
* session traces (what the simulator records per replica): each request is
  (session, prompt blocks, blocks held after the step). A session's KV is a
  prefix and all its blocks are next used together, so block-level Bélády
  reduces to evicting the session with the farthest next use, tail first;
  ``replay_sessions`` does that without expanding sessions into blocks.

The simulator's ``misses_vs_oracle`` is a policy's prompt-block misses over
``replay_sessions(..., "belady")`` on the same placements, GPU tier only.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence

NEVER = 1 << 62


def _next_uses(keys: Sequence[Hashable]) -> list[int]:
    nxt = [NEVER] * len(keys)
    last: dict[Hashable, int] = {}
    for p in range(len(keys) - 1, -1, -1):
        nxt[p] = last.get(keys[p], NEVER)
        last[keys[p]] = p
    return nxt


def replay_blocks(
    requests: Sequence[Sequence[Hashable]], capacity_blocks: int, policy: str = "lru"
) -> dict[str, int | float]:
    """Replay block requests through one cache; hits and misses by block reference."""
    refs = [b for req in requests for b in req]
    hits = 0
    if policy == "lru":
        lru: OrderedDict[Hashable, None] = OrderedDict()
        for b in refs:
            if b in lru:
                hits += 1
                lru.move_to_end(b)
                continue
            lru[b] = None
            if len(lru) > capacity_blocks:
                lru.popitem(last=False)
    elif policy == "belady":
        nxt = _next_uses(refs)
        cur: dict[Hashable, int] = {}
        heap: list[tuple[int, int, Hashable]] = []  # (-next use, tiebreak, block)
        for p, b in enumerate(refs):
            if b in cur:
                hits += 1
            cur[b] = nxt[p]
            heapq.heappush(heap, (-nxt[p], p, b))
            if len(cur) > capacity_blocks:
                stash = []
                while heap:
                    entry = heapq.heappop(heap)
                    v = entry[2]
                    if cur.get(v) != -entry[0]:
                        continue  # stale: the block was used again since
                    if v == b:
                        stash.append(entry)  # demand paging: the used block stays
                        continue
                    del cur[v]
                    break
                for entry in stash:
                    heapq.heappush(heap, entry)
    else:
        raise ValueError(f"unknown replay policy {policy!r}")
    n = len(refs)
    return {
        "requests": len(requests),
        "block_refs": n,
        "hits": hits,
        "misses": n - hits,
        "miss_ratio": (n - hits) / n if n else 0.0,
    }


def replay_sessions(
    trace: Sequence[tuple[int, int, int]], capacity_blocks: int, policy: str = "belady"
) -> int:
    """Prompt-block misses of a session trace through one cache of ``capacity_blocks``."""
    keys = [t[0] for t in trace]
    nxt = _next_uses(keys) if policy == "belady" else []
    held: dict[int, int] = {}
    order: OrderedDict[int, None] = OrderedDict()
    cur: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    used = misses = 0
    for p, (s, need, after) in enumerate(trace):
        have = held.get(s, 0)
        misses += need - min(have, need)
        after = min(max(after, need), capacity_blocks)
        used += after - have
        held[s] = after
        if policy == "belady":
            cur[s] = nxt[p]
            heapq.heappush(heap, (-nxt[p], s))
        else:
            order[s] = None
            order.move_to_end(s)
        while used > capacity_blocks:
            if policy == "belady":
                victim = _farthest_other(heap, cur, held, s)
                if victim is None:
                    break
                v = victim
            else:
                v = next(iter(order))
                if v == s:
                    order.move_to_end(s)
                    v = next(iter(order))
                    if v == s:
                        break
            take = min(held[v], used - capacity_blocks)
            held[v] -= take
            used -= take
            if held[v] == 0:
                del held[v]
                if policy != "belady":
                    order.pop(v, None)
    return misses


def _farthest_other(
    heap: list[tuple[int, int]], cur: dict[int, int], held: dict[int, int], s: int
) -> int | None:
    """The held session other than ``s`` with the farthest next use (stale entries dropped)."""
    stash = []
    victim = None
    while heap:
        neg, v = heap[0]
        if v not in held or cur.get(v) != -neg:
            heapq.heappop(heap)
        elif v == s:
            stash.append(heapq.heappop(heap))
        else:
            victim = v
            break
    for entry in stash:
        heapq.heappush(heap, entry)
    return victim
