"""Decoding vLLM's KV-event payloads (msgspec-msgpack `EventBatch`) into `KvEventBatch`.

vLLM has published two encodings of the same structs (vllm/distributed/kv_events.py):
older releases declare `array_like=True`, so a batch is `[ts, events, dp_rank]` and an
event is `[tag, field, ...]`; current releases drop it, so a batch is a map and an
event is a map with a `"type"` tag. Both use `omit_defaults=True`, so trailing
defaulted fields may be absent. Decoding untyped handles every release alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2

__all__ = ["KvEventDecodeError", "block_hash_from_vllm", "decode_kv_events", "msgpack_decode"]

# Field order of the vLLM structs: positional order of the array_like encoding.
_STORED_FIELDS = (
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_BATCH_FIELDS = ("ts", "events", "data_parallel_rank")
_MEDIUM_TO_TIER: dict[Any, types_pb2.Tier.ValueType] = {
    None: types_pb2.TIER_GPU,  # vLLM's prefix cache lives on the GPU unless told otherwise
    "GPU": types_pb2.TIER_GPU,
    "CPU": types_pb2.TIER_HOST,
    "DISK": types_pb2.TIER_DISK,
}
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


class KvEventDecodeError(ValueError):
    """The payload is not a vLLM EventBatch."""


def msgpack_decode(payload: bytes) -> Any:
    """Decodes msgpack with msgspec (or msgpack) without a schema."""
    try:
        import msgspec
    except ImportError:
        try:
            import msgpack
        except ImportError as exc:
            raise ImportError(
                "decoding vLLM KV events needs msgspec: pip install 'kvsched-client[vllm]'"
            ) from exc
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    try:
        return msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise KvEventDecodeError(str(exc)) from exc


def block_hash_from_vllm(value: bytes | int) -> types_pb2.BlockHash:
    """Returns a vLLM `ExternalBlockHash` (bytes | int) as a lossless wire BlockHash.

    NOTE: ints from vLLM come from Python's hash(), which is signed, so anything
    that fits int64 travels as int64_hash; only values above 2**63-1 (xxhash64,
    Dynamo) need the uint64 form. Either way the same int comes back out.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return types_pb2.BlockHash(digest=bytes(value))
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvEventDecodeError(f"block hash must be bytes or int, got {type(value).__name__}")
    if _I64_MIN <= value < 2**63:
        return types_pb2.BlockHash(int64_hash=value)
    if 0 <= value <= _U64_MAX:
        return types_pb2.BlockHash(uint64_hash=value)
    # Very old vLLM put whole SHA-256 ints in hashes; keep every bit as bytes.
    if value < 0:
        raise KvEventDecodeError(f"block hash {value} is below int64")
    return types_pb2.BlockHash(digest=value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _fields(obj: Any, names: Sequence[str], skip_tag: bool) -> tuple[str | None, dict[str, Any]]:
    """Returns (tag, fields by name) for an array_like or a map encoding."""
    if isinstance(obj, Mapping):
        return obj.get("type"), dict(obj)
    if isinstance(obj, list | tuple):
        tag = obj[0] if skip_tag and obj else None
        values = obj[1:] if skip_tag else obj
        return tag, dict(zip(names, values, strict=False))
    raise KvEventDecodeError(f"expected an array or a map, got {type(obj).__name__}")


def _event(obj: Any) -> types_pb2.KvEvent:
    tag = obj.get("type") if isinstance(obj, Mapping) else (obj[0] if obj else None)
    if tag == "BlockStored":
        _, f = _fields(obj, _STORED_FIELDS, skip_tag=True)
        stored = types_pb2.BlockStored(
            block_hashes=[block_hash_from_vllm(x) for x in f.get("block_hashes") or ()],
            token_count=len(f.get("token_ids") or ()),
            block_size_tokens=int(f.get("block_size") or 0),
            tier=_tier(f.get("medium")),
            group_index=int(f.get("group_idx") or 0),
            lora_id=int(f.get("lora_id") or 0),
        )
        parent = f.get("parent_block_hash")
        if parent is not None:
            stored.parent_block_hash.CopyFrom(block_hash_from_vllm(parent))
        return types_pb2.KvEvent(stored=stored)
    if tag == "BlockRemoved":
        _, f = _fields(obj, _REMOVED_FIELDS, skip_tag=True)
        removed = types_pb2.BlockRemoved(
            block_hashes=[block_hash_from_vllm(x) for x in f.get("block_hashes") or ()],
            tier=_tier(f.get("medium")),
            group_index=int(f.get("group_idx") or 0),
        )
        return types_pb2.KvEvent(removed=removed)
    if tag == "AllBlocksCleared":
        return types_pb2.KvEvent(all_cleared=types_pb2.AllBlocksCleared())
    raise KvEventDecodeError(f"unknown KV event tag {tag!r}")


def _tier(medium: Any) -> types_pb2.Tier.ValueType:
    return _MEDIUM_TO_TIER.get(medium, types_pb2.TIER_EXTERNAL)


def decode_kv_events(payload: bytes) -> types_pb2.KvEventBatch:
    """Returns one vLLM ZMQ payload (the last frame) as a KvEventBatch."""
    _, f = _fields(msgpack_decode(payload), _BATCH_FIELDS, skip_tag=False)
    if "ts" not in f or "events" not in f:
        raise KvEventDecodeError("an EventBatch needs ts and events")
    return types_pb2.KvEventBatch(
        ts_s=float(f["ts"]),
        events=[_event(ev) for ev in f["events"]],
        data_parallel_rank=int(f.get("data_parallel_rank") or 0),
    )
