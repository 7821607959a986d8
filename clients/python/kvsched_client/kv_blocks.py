"""Block hashing chained over the parent hash, and KV events in the wire shape."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2

__all__ = ["KvEventLog", "chain_hashes", "extend_chain", "wire_hash"]

_ROOT_PARENT = b"kvsched-root"
_STORED, _REMOVED, _CLEARED = 1, 2, 3


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
    n_old = len(old_tokens)
    if len(tokens) >= n_old and tokens[:n_old] == old_tokens:
        keep = min(len(old_chain), len(tokens) // bs)  # the common case: the context grew
    else:
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
    """Collects BlockStored / BlockRemoved / AllBlocksCleared; `take` returns wire messages.

    Events are kept as plain tuples and built into protobuf only when taken, so a
    simulator that never takes them (or turns the log off) does not pay for them.
    """

    __slots__ = ("_events", "block_size_tokens", "enabled")

    def __init__(self, block_size_tokens: int, enabled: bool = True) -> None:
        self.block_size_tokens = block_size_tokens
        self.enabled = enabled
        self._events: list[tuple[int, Any, Any, int, str]] = []

    def stored(self, hashes: list[bytes], parent: bytes | None, tier: int, session_id: str) -> None:
        """Records that blocks (one contiguous run of a prefix) were stored on a tier."""
        if self.enabled:
            self._events.append((_STORED, hashes, parent, tier, session_id))

    def removed(self, h: bytes, tier: int) -> None:
        """Records that one block left a tier."""
        if self.enabled:
            self._events.append((_REMOVED, h, None, tier, ""))

    def cleared(self, tier: int = types_pb2.TIER_UNSPECIFIED) -> None:
        """Records that a tier (or every tier) was reset."""
        if self.enabled:
            self._events.append((_CLEARED, None, None, tier, ""))

    def take(self) -> list[types_pb2.KvEvent]:
        """Returns and forgets the events recorded so far, as wire messages.

        Adjacent removals from one tier share one BlockRemoved (its hashes are a
        list on the wire): evictions come in runs, and this keeps them cheap.
        """
        events, self._events = self._events, []
        out: list[types_pb2.KvEvent] = []
        run: list[bytes] = []
        run_tier = -1
        for kind, hashes, parent, tier, session_id in events:
            if kind == _REMOVED and tier == run_tier:
                run.append(hashes)
                continue
            if run:
                out.append(self._removed_pb(run, run_tier))
                run, run_tier = [], -1
            if kind == _REMOVED:
                run, run_tier = [hashes], tier
            else:
                out.append(self._to_pb(kind, hashes, parent, tier, session_id))
        if run:
            out.append(self._removed_pb(run, run_tier))
        return out

    def _removed_pb(self, hashes: list[bytes], tier: int) -> types_pb2.KvEvent:
        removed = types_pb2.BlockRemoved(block_hashes=[wire_hash(h) for h in hashes], tier=tier)  # type: ignore[arg-type]
        return types_pb2.KvEvent(removed=removed)

    def __len__(self) -> int:
        return len(self._events)

    def _to_pb(
        self, kind: int, hashes: Any, parent: bytes | None, tier: int, session_id: str
    ) -> types_pb2.KvEvent:
        if kind == _CLEARED:
            return types_pb2.KvEvent(all_cleared=types_pb2.AllBlocksCleared(tier=tier))  # type: ignore[arg-type]
        stored = types_pb2.BlockStored(
            block_hashes=[wire_hash(h) for h in hashes],
            token_count=len(hashes) * self.block_size_tokens,
            block_size_tokens=self.block_size_tokens,
            tier=tier,  # type: ignore[arg-type]
            session_id=session_id,
        )
        if parent is not None:
            stored.parent_block_hash.CopyFrom(wire_hash(parent))
        return types_pb2.KvEvent(stored=stored)
