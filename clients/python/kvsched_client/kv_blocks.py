"""Block hashing chained over the parent hash, and KV events in the wire shape."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from kvsched_client._proto.kvsched.v1 import types_pb2

__all__ = ["KvEventLog", "chain_hashes", "extend_chain", "wire_hash"]

_ROOT_PARENT = b"kvsched-root"


def chain_hashes(
    token_ids: Sequence[int],
    block_size_tokens: int,
    parent: bytes | None,
    salt: str | None,
) -> list[bytes]:
    """Returns the SHA-256 of each full block, each chained over its parent's hash.

    As in vLLM, the tenant salt enters only the root block; chaining carries it
    to every later block, so two tenants never share a prefix.
    """
    out: list[bytes] = []
    n_full = len(token_ids) // block_size_tokens
    for i in range(n_full):
        block = token_ids[i * block_size_tokens : (i + 1) * block_size_tokens]
        h = hashlib.sha256(parent if parent is not None else _ROOT_PARENT)
        if parent is None and salt:
            h.update(salt.encode())
        h.update(struct.pack(f"<{len(block)}q", *block))
        parent = h.digest()
        out.append(parent)
    return out


def extend_chain(
    old_tokens: Sequence[int],
    old_chain: list[bytes],
    tokens: Sequence[int],
    block_size_tokens: int,
    salt: str,
) -> list[bytes]:
    """Returns the chain for `tokens`, reusing the hashes of blocks that did not change."""
    bs = block_size_tokens
    keep = 0
    while (
        keep < len(old_chain)
        and (keep + 1) * bs <= len(tokens)
        and tokens[keep * bs : (keep + 1) * bs] == old_tokens[keep * bs : (keep + 1) * bs]
    ):
        keep += 1
    parent = old_chain[keep - 1] if keep else None
    return old_chain[:keep] + chain_hashes(tokens[keep * bs :], bs, parent, None if keep else salt)


def wire_hash(digest: bytes) -> types_pb2.BlockHash:
    """Returns a digest as the wire BlockHash."""
    return types_pb2.BlockHash(digest=digest)


class KvEventLog:
    """Collects BlockStored / BlockRemoved / AllBlocksCleared as wire messages."""

    __slots__ = ("_events", "block_size_tokens")

    def __init__(self, block_size_tokens: int) -> None:
        self.block_size_tokens = block_size_tokens
        self._events: list[types_pb2.KvEvent] = []

    def stored(self, hashes: list[bytes], parent: bytes | None, tier: int, session_id: str) -> None:
        """Records that blocks (one contiguous run of a prefix) were stored on a tier."""
        ev = types_pb2.BlockStored(
            block_hashes=[wire_hash(h) for h in hashes],
            token_count=len(hashes) * self.block_size_tokens,
            block_size_tokens=self.block_size_tokens,
            tier=tier,  # type: ignore[arg-type]
            session_id=session_id,
        )
        if parent is not None:
            ev.parent_block_hash.CopyFrom(wire_hash(parent))
        self._events.append(types_pb2.KvEvent(stored=ev))

    def removed(self, h: bytes, tier: int) -> None:
        """Records that one block left a tier (one event per block, as vLLM does)."""
        ev = types_pb2.BlockRemoved(block_hashes=[wire_hash(h)], tier=tier)  # type: ignore[arg-type]
        self._events.append(types_pb2.KvEvent(removed=ev))

    def cleared(self, tier: int = types_pb2.TIER_UNSPECIFIED) -> None:
        """Records that a tier (or every tier) was reset."""
        ev = types_pb2.AllBlocksCleared(tier=tier)  # type: ignore[arg-type]
        self._events.append(types_pb2.KvEvent(all_cleared=ev))

    def take(self) -> list[types_pb2.KvEvent]:
        """Returns and forgets the events recorded so far."""
        events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._events)
