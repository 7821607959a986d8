"""decode_kv_events against payloads built exactly as vLLM builds them."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")

from kvsched_client._proto.kvsched.v1 import types_pb2  # noqa: E402
from kvsched_client.adapters.vllm import decode_kv_events  # noqa: E402
from kvsched_client.adapters.vllm_events import (  # noqa: E402
    KvEventDecodeError,
    block_hash_from_vllm,
)

ExternalBlockHash = bytes | int


# Current vLLM (vllm/distributed/kv_events.py): map-encoded, tagged by "type".
class EventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


# Older vLLM: array_like structs (positional; the tag is the first element).
class OldEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class OldKVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class OldBlockStored(OldKVCacheEvent, tag="BlockStored"):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class OldBlockRemoved(OldKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[ExternalBlockHash]
    medium: str | None


class OldAllBlocksCleared(OldKVCacheEvent, tag="AllBlocksCleared"):
    pass


SHA = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
INTS = [2**63 - 1, -(2**63), -42, 2**64 - 1, 0]


def _hash_back(h: types_pb2.BlockHash) -> bytes | int:
    return getattr(h, h.WhichOneof("value"))


def test_current_format_sha256_hashes_and_dp_rank() -> None:
    batch = KVEventBatch(
        ts=1712.5,
        events=[
            BlockStored(
                block_hashes=SHA[1:],
                parent_block_hash=SHA[0],
                token_ids=list(range(32)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                group_idx=2,
            ),
            BlockRemoved(block_hashes=[SHA[0]], medium="CPU"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=3,
    )
    payload = msgspec.msgpack.Encoder().encode(batch)
    out = decode_kv_events(payload)
    assert (out.ts_s, out.data_parallel_rank, len(out.events)) == (1712.5, 3, 3)
    st = out.events[0].stored
    assert [h.digest for h in st.block_hashes] == SHA[1:]
    assert st.parent_block_hash.digest == SHA[0]
    assert (st.token_count, st.block_size_tokens, st.tier, st.group_index, st.lora_id) == (
        32,
        16,
        types_pb2.TIER_GPU,
        2,
        0,
    )
    rm = out.events[1].removed
    assert ([h.digest for h in rm.block_hashes], rm.tier) == ([SHA[0]], types_pb2.TIER_HOST)
    assert out.events[2].WhichOneof("event") == "all_cleared"


def test_legacy_array_like_format_with_int_hashes() -> None:
    batch = OldEventBatch(
        ts=5.0,
        events=[
            OldBlockStored(
                block_hashes=INTS,
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=4,
                lora_id=7,
                medium=None,
            ),
            OldBlockRemoved(block_hashes=[-42, 2**64 - 1], medium="GPU"),
            OldAllBlocksCleared(),
        ],
    )
    payload = msgspec.msgpack.encode(batch)
    assert msgspec.msgpack.decode(payload)[1][0][0] == "BlockStored"  # really array-like
    out = decode_kv_events(payload)
    st = out.events[0].stored
    assert [_hash_back(h) for h in st.block_hashes] == INTS
    assert not st.HasField("parent_block_hash")
    assert (st.lora_id, st.tier, out.data_parallel_rank) == (7, types_pb2.TIER_GPU, 0)
    assert [_hash_back(h) for h in out.events[1].removed.block_hashes] == [-42, 2**64 - 1]


@pytest.mark.parametrize("value", [*SHA, *INTS, b"\x00" * 8])
def test_hashes_round_trip_through_the_wire_without_loss(value: bytes | int) -> None:
    h = block_hash_from_vllm(value)
    again = types_pb2.BlockHash.FromString(h.SerializeToString())
    assert _hash_back(again) == value and type(_hash_back(again)) is type(value)


def test_signed_ints_use_int64_and_large_unsigned_use_uint64() -> None:
    assert block_hash_from_vllm(-1).WhichOneof("value") == "int64_hash"
    assert block_hash_from_vllm(2**63 - 1).WhichOneof("value") == "int64_hash"
    assert block_hash_from_vllm(2**63).WhichOneof("value") == "uint64_hash"


def test_garbage_is_rejected() -> None:
    with pytest.raises(KvEventDecodeError):
        decode_kv_events(b"\xc1")
    with pytest.raises(KvEventDecodeError):
        decode_kv_events(msgspec.msgpack.encode({"ts": 1.0, "events": [{"type": "Nope"}]}))


def test_real_vllm_classes_when_importable() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    batch = kv_events.KVEventBatch(
        ts=1.0,
        events=[
            kv_events.BlockStored(
                block_hashes=[SHA[0], -5],
                parent_block_hash=None,
                token_ids=[1] * 16,
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        ],
        data_parallel_rank=1,
    )
    out = decode_kv_events(msgspec.msgpack.Encoder().encode(batch))
    assert [_hash_back(h) for h in out.events[0].stored.block_hashes] == [SHA[0], -5]
    assert out.data_parallel_rank == 1
