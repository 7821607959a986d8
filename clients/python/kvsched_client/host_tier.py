"""The host (CPU DRAM) tier of the reference pool and the link that feeds it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from kvsched_client._proto.kvsched.v1 import types_pb2
from kvsched_client.kv_blocks import KvEventLog

__all__ = ["HostLink", "HostTier"]


class HostTier:
    """Blocks by hash, in LRU order (the head is evicted first), with a capacity."""

    __slots__ = ("_blocks", "_log", "capacity_blocks", "evicted_blocks")

    def __init__(self, capacity_blocks: int, log: KvEventLog) -> None:
        self.capacity_blocks = capacity_blocks
        self._log = log
        self._blocks: OrderedDict[bytes, bytes | None] = OrderedDict()  # hash -> parent
        self.evicted_blocks = 0

    def __contains__(self, h: object) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blocks)

    def put_run(self, hashes: list[bytes], parent: bytes | None, session_id: str) -> None:
        """Stores a contiguous run of a prefix at the MRU end; the caller made room first."""
        assert len(self._blocks) + len(hashes) <= self.capacity_blocks, "host tier is full"
        for h in hashes:
            self._blocks[h] = parent
            parent = h
        self._log.stored(hashes, self._blocks[hashes[0]], types_pb2.TIER_HOST, session_id)

    def pop(self, h: bytes) -> bytes | None:
        """Removes one block; returns its parent hash."""
        parent = self._blocks.pop(h)
        self._log.removed(h, types_pb2.TIER_HOST)
        return parent

    def touch(self, h: bytes) -> None:
        """Marks a block most recently used."""
        self._blocks.move_to_end(h)

    def make_room(self, n_blocks: int, keep: set[bytes]) -> None:
        """Evicts LRU blocks (those outside `keep` first) until `n_blocks` fit."""
        while len(self._blocks) + n_blocks > self.capacity_blocks:
            victim = next((h for h in self._blocks if h not in keep), None)
            if victim is None:
                victim = next(iter(self._blocks))
            self.pop(victim)
            self.evicted_blocks += 1


class HostLink:
    """Host <-> GPU link; transfers queue per direction (PCIe is full duplex)."""

    __slots__ = ("_d2h_free_at_s", "_h2d_free_at_s", "bytes_per_s")

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._h2d_free_at_s = 0.0
        self._d2h_free_at_s = 0.0

    def book(self, n_bytes: int, now: float, *, to_gpu: bool) -> float:
        """Books a transfer after those already queued; returns when it is done."""
        if n_bytes == 0:
            return now
        duration_s = n_bytes / self.bytes_per_s
        if to_gpu:
            self._h2d_free_at_s = max(now, self._h2d_free_at_s) + duration_s
            return self._h2d_free_at_s
        self._d2h_free_at_s = max(now, self._d2h_free_at_s) + duration_s
        return self._d2h_free_at_s
