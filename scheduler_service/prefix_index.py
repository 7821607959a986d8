"""Which workers hold which prompt blocks on the GPU, learned from their KV events.

A router that sends ``prefix_block_hashes`` with a Place gets the workers
that already hold the longest run of those blocks scored for it, the way
llm-d's precise prefix-cache scorer reads vLLM's KV events. The index maps a
block hash (in the engine's own form: bytes or int) to a bit set of worker
slots. It is bounded: past ``max_blocks`` hashes the least recently stored
goes, so it costs at most a few hundred bytes a block whatever the fleet.

Only Place reads it, and Place is not journaled: the index is soft state,
kept out of the cluster state and its snapshots. After a restart it fills
again from the KV events that follow (a router's miss meanwhile costs a
prefill, never a wrong decision).

Only the first KV cache group is indexed (a hybrid model's other groups hold
the same tokens), and only the GPU tier (a host copy is a reload, not a hit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import KvEvent, KvEventKind, Tier

DEFAULT_MAX_BLOCKS = 1 << 20


class PrefixIndex:
    """Block hash → workers holding it on the GPU (bit set of worker slots)."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        # NOTE: insertion order is store order: a re-stored hash moves to the
        # end, so the first key is the least recently stored one.
        self._where: dict[bytes | int, int] = {}

    def __getstate__(self) -> dict[str, int]:
        # soft state: a snapshot of the engine carries the bound, not the blocks
        return {"max_blocks": self.max_blocks}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.max_blocks = state["max_blocks"]
        self._where = {}

    def __len__(self) -> int:
        return len(self._where)

    def apply(self, w: int, events: Sequence[KvEvent]) -> None:
        """Fold one worker's KV events into the index."""
        where = self._where
        bit = 1 << w
        for ev in events:
            if ev.tier is not Tier.GPU or ev.group_index != 0:
                continue
            if ev.kind is KvEventKind.STORED:
                for h in ev.block_hashes:
                    held = where.pop(h, 0)
                    where[h] = held | bit
                while len(where) > self.max_blocks:
                    del where[next(iter(where))]
            elif ev.kind is KvEventKind.REMOVED:
                for h in ev.block_hashes:
                    held = where.get(h, 0) & ~bit
                    if held:
                        where[h] = held
                    else:
                        where.pop(h, None)
            else:
                self.forget_worker(w)

    def forget_worker(self, w: int) -> None:
        """Drop every block of worker ``w`` (its cache was cleared or it restarted)."""
        bit = 1 << w
        where = self._where
        for h in [h for h, held in where.items() if held & bit]:
            held = where[h] & ~bit
            if held:
                where[h] = held
            else:
                del where[h]

    def prefix_blocks(self, hashes: Sequence[bytes | int], out: npt.NDArray[np.int64]) -> list[int]:
        """Per worker, how many of ``hashes`` it holds as an unbroken run from the first.

        Writes the counts into ``out`` (indexed by worker slot) and returns the
        slots it wrote, so the caller can zero just those afterwards.
        """
        where = self._where
        alive = where.get(hashes[0], 0) if hashes else 0
        touched: list[int] = []
        i = 1
        while alive and i < len(hashes):
            now_alive = alive & where.get(hashes[i], 0)
            _record(alive & ~now_alive, i, out, touched)  # their runs end here
            alive = now_alive
            i += 1
        _record(alive, i, out, touched)
        return touched


def _record(workers: int, run: int, out: npt.NDArray[np.int64], touched: list[int]) -> None:
    """Write ``run`` for every worker slot in the bit set ``workers`` that ``out`` holds."""
    while workers:
        low = workers & -workers
        w = low.bit_length() - 1
        if w < len(out):
            out[w] = run
            touched.append(w)
        workers ^= low
