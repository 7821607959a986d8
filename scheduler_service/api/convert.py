"""Proto ⇄ domain conversion. Inbound conversion validates every field.

Parse, don't validate: each ``*_from_pb`` returns a domain object or raises
``Rejected(field, description)`` naming the offending field as a dotted path
(``session_events.events[3].context_tokens``), before anything is applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvsched_client._proto.kvsched.v1 import (
    admin_pb2,
    placement_pb2,
    types_pb2,
    worker_pb2,
)
from scheduler_service.domain import (
    CacheSpec,
    ClusterStatsView,
    DirectiveOutcome,
    EventId,
    EventKind,
    KvEvent,
    KvEventKind,
    Placement,
    PlaceRequest,
    PoolInventory,
    Rejected,
    RetentionDirective,
    SessionEvent,
    SessionId,
    SessionResidency,
    SessionView,
    TenantId,
    TenantSpec,
    Tier,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
    WorkerView,
)

MAX_ID_BYTES = 256
MAX_SHORT_BYTES = 128
MAX_BATCH_EVENTS = 4096
MAX_TOKENS = 1 << 30  # ~1e9 tokens: far past any context window, far below overflow
MAX_STEP_INDEX = 1 << 20
MAX_BLOCKS = 1 << 40
MAX_BLOCK_SIZE_TOKENS = 4096
MAX_BYTES_PER_TOKEN = 1 << 24
MAX_RATE = 1e15
MAX_HINT_S = 7 * 24 * 3600.0
MAX_CANDIDATES = 16
MAX_DIGEST_BYTES = 64
MAX_REASON_BYTES = 512

_EVENT_KINDS = {k.value for k in EventKind}
_KIND_BY_VALUE = {k.value: k for k in EventKind}
_NO_WORKER = WorkerId("")
_TIERS = {t.value for t in Tier}


def _id(value: str, field: str, limit: int = MAX_ID_BYTES, required: bool = True) -> str:
    if not value:
        if required:
            raise Rejected(field, "must not be empty")
        return value
    n = len(value.encode())
    if n > limit:
        raise Rejected(field, f"must be at most {limit} bytes, got {n}")
    if not value.isprintable():
        raise Rejected(field, "must not contain control characters")
    return value


def _count(value: int, field: str, limit: int, minimum: int = 0) -> int:
    if value < minimum:
        raise Rejected(field, f"must be >= {minimum}, got {value}")
    if value > limit:
        raise Rejected(field, f"must be <= {limit}, got {value}")
    return value


def _real(
    value: float, field: str, limit: float, minimum: float = 0.0, positive: bool = False
) -> float:
    if not math.isfinite(value):
        raise Rejected(field, "must be a finite number")
    if positive and value <= 0:
        raise Rejected(field, f"must be > 0, got {value}")
    if value < minimum:
        raise Rejected(field, f"must be >= {minimum}, got {value}")
    if value > limit:
        raise Rejected(field, f"must be <= {limit}, got {value}")
    return value


def _tier(value: int, field: str, allow_unspecified: bool = False) -> Tier:
    if value not in _TIERS or (value == 0 and not allow_unspecified):
        raise Rejected(field, f"unknown tier {value}")
    return Tier(value)


# -- worker stream -----------------------------------------------------------


def cache_spec_from_pb(pb: types_pb2.CacheSpec, field: str) -> CacheSpec:
    """Validated CacheSpec."""
    host_blocks = _count(pb.host_capacity_blocks, f"{field}.host_capacity_blocks", MAX_BLOCKS)
    link = _real(pb.host_link_bytes_per_s, f"{field}.host_link_bytes_per_s", MAX_RATE)
    if host_blocks and link <= 0:
        raise Rejected(f"{field}.host_link_bytes_per_s", "must be > 0 when a host tier exists")
    return CacheSpec(
        block_size_tokens=_count(
            pb.block_size_tokens, f"{field}.block_size_tokens", MAX_BLOCK_SIZE_TOKENS, 1
        ),
        bytes_per_token=_count(
            pb.bytes_per_token, f"{field}.bytes_per_token", MAX_BYTES_PER_TOKEN, 1
        ),
        gpu_capacity_blocks=_count(
            pb.gpu_capacity_blocks, f"{field}.gpu_capacity_blocks", MAX_BLOCKS, 1
        ),
        host_capacity_blocks=host_blocks,
        hash_algo=_id(pb.hash_algo, f"{field}.hash_algo", MAX_SHORT_BYTES, required=False),
        prefill_tokens_per_s=_real(
            pb.prefill_tokens_per_s, f"{field}.prefill_tokens_per_s", MAX_RATE, positive=True
        ),
        host_link_bytes_per_s=link,
        decode_tokens_per_s=_real(pb.decode_tokens_per_s, f"{field}.decode_tokens_per_s", MAX_RATE),
        hbm_bytes_per_s=_real(pb.hbm_bytes_per_s, f"{field}.hbm_bytes_per_s", MAX_RATE),
        kv_transfer_domain=_id(
            pb.kv_transfer_domain, f"{field}.kv_transfer_domain", required=False
        ),
    )


def hello_from_pb(pb: worker_pb2.Hello, field: str = "hello") -> WorkerSpec:
    """Validated WorkerSpec from a Hello."""
    if not pb.HasField("cache_spec"):
        raise Rejected(f"{field}.cache_spec", "is required")
    return WorkerSpec(
        worker_id=WorkerId(_id(pb.worker_id, f"{field}.worker_id")),
        epoch=_count(pb.epoch, f"{field}.epoch", (1 << 63) - 1, 1),
        cache=cache_spec_from_pb(pb.cache_spec, f"{field}.cache_spec"),
        dp_rank=_count(pb.dp_rank, f"{field}.dp_rank", 1 << 16),
        endpoint=_id(pb.endpoint, f"{field}.endpoint", required=False),
        engine_name=_id(pb.engine_name, f"{field}.engine_name", MAX_SHORT_BYTES, required=False),
        engine_version=_id(
            pb.engine_version, f"{field}.engine_version", MAX_SHORT_BYTES, required=False
        ),
        model=_id(pb.model, f"{field}.model", required=False),
    )


def session_event_from_pb(
    pb: types_pb2.SessionEvent, field: str, worker_id: WorkerId = _NO_WORKER
) -> SessionEvent:
    """Validated SessionEvent."""
    # NOTE: this runs once per event on the hot path. A value passes the fast
    # check only if it is certainly valid (a string of n characters is at most
    # 4n UTF-8 bytes); anything else takes the slow path, which checks field by
    # field and names the first offender.
    kind = _KIND_BY_VALUE.get(pb.kind)
    eid, sid, tid, at, tool = pb.event_id, pb.session_id, pb.tenant_id, pb.agent_type, pb.tool_name
    ctx, new, step, t = pb.context_tokens, pb.new_tokens, pb.step_index, pb.event_time_s
    if pb.HasField("hints"):
        h = pb.hints
        lat, nxt, last = h.expected_tool_latency_s, h.declared_next_step, h.last_step
    else:
        lat, nxt, last = 0.0, "", False
    if (
        kind is None
        or not 0 < len(eid) <= MAX_SHORT_BYTES // 4
        or not 0 < len(sid) <= MAX_ID_BYTES // 4
        or not 0 < len(tid) <= MAX_SHORT_BYTES // 4
        or not 0 < len(at) <= MAX_SHORT_BYTES // 4
        or len(tool) > MAX_SHORT_BYTES // 4
        or len(nxt) > MAX_SHORT_BYTES // 4
        or ctx > MAX_TOKENS
        or new > MAX_TOKENS
        or step > MAX_STEP_INDEX
        or not 0.0 <= t <= 1e12
        or not 0.0 <= lat <= MAX_HINT_S
        or not (eid + sid + tid + at + tool + nxt).isprintable()
    ):
        return _session_event_checked(pb, field, worker_id)
    return SessionEvent(
        EventId(eid),
        SessionId(sid),
        TenantId(tid),
        at,
        step,
        kind,
        ctx,
        new,
        tool,
        lat,
        nxt,
        last,
        t,
        worker_id,
    )


def _session_event_checked(
    pb: types_pb2.SessionEvent, field: str, worker_id: WorkerId
) -> SessionEvent:
    if pb.kind not in _EVENT_KINDS:
        raise Rejected(f"{field}.kind", f"unknown session event kind {pb.kind}")
    kind = EventKind(pb.kind)
    tool = _id(pb.tool_name, f"{field}.tool_name", MAX_SHORT_BYTES, required=False)
    hints = pb.hints
    return SessionEvent(
        event_id=EventId(_id(pb.event_id, f"{field}.event_id", MAX_SHORT_BYTES)),
        session_id=SessionId(_id(pb.session_id, f"{field}.session_id")),
        tenant_id=TenantId(_id(pb.tenant_id, f"{field}.tenant_id", MAX_SHORT_BYTES)),
        agent_type=_id(pb.agent_type, f"{field}.agent_type", MAX_SHORT_BYTES),
        step_index=_count(pb.step_index, f"{field}.step_index", MAX_STEP_INDEX),
        kind=kind,
        context_tokens=_count(pb.context_tokens, f"{field}.context_tokens", MAX_TOKENS),
        new_tokens=_count(pb.new_tokens, f"{field}.new_tokens", MAX_TOKENS),
        tool_name=tool,
        expected_tool_latency_s=_real(
            hints.expected_tool_latency_s, f"{field}.hints.expected_tool_latency_s", MAX_HINT_S
        ),
        declared_next_step=_id(
            hints.declared_next_step, f"{field}.hints.declared_next_step", MAX_SHORT_BYTES, False
        ),
        last_step=hints.last_step,
        event_time_s=_real(pb.event_time_s, f"{field}.event_time_s", 1e12),
        worker_id=worker_id,
    )


def session_events_from_pb(
    events: Sequence[types_pb2.SessionEvent], field: str, worker_id: WorkerId
) -> list[SessionEvent]:
    """Validated batch of session events (1..4096)."""
    if not events:
        raise Rejected(field, "must hold at least one event")
    if len(events) > MAX_BATCH_EVENTS:
        raise Rejected(field, f"must hold at most {MAX_BATCH_EVENTS} events, got {len(events)}")
    return [session_event_from_pb(e, f"{field}[{i}]", worker_id) for i, e in enumerate(events)]


def block_hash_from_pb(pb: types_pb2.BlockHash, field: str) -> bytes | int:
    """The hash in its engine form: bytes for digests, int for 64-bit hashes."""
    which = pb.WhichOneof("value")
    if which == "digest":
        n = len(pb.digest)
        if not 1 <= n <= MAX_DIGEST_BYTES:
            raise Rejected(f"{field}.digest", f"must be 1..{MAX_DIGEST_BYTES} bytes, got {n}")
        return bytes(pb.digest)
    if which == "uint64_hash":
        return int(pb.uint64_hash)
    if which == "int64_hash":
        return int(pb.int64_hash)
    raise Rejected(field, "one of digest, uint64_hash, int64_hash is required")


def block_hash_to_pb(value: bytes | int) -> types_pb2.BlockHash:
    """Wire form of an engine block hash (lossless for bytes, u64 and i64)."""
    if isinstance(value, bytes):
        return types_pb2.BlockHash(digest=value)
    if value < 0:
        return types_pb2.BlockHash(int64_hash=value)
    return types_pb2.BlockHash(uint64_hash=value)


def kv_events_from_pb(pb: types_pb2.KvEventBatch, field: str) -> list[KvEvent]:
    """Validated KV events of a batch."""
    _real(pb.ts_s, f"{field}.ts_s", 1e12)
    if len(pb.events) > MAX_BATCH_EVENTS * 4:
        raise Rejected(f"{field}.events", f"must hold at most {MAX_BATCH_EVENTS * 4} events")
    out: list[KvEvent] = []
    for i, ev in enumerate(pb.events):
        f = f"{field}.events[{i}]"
        which = ev.WhichOneof("event")
        if which == "stored":
            s = ev.stored
            hashes = tuple(
                block_hash_from_pb(h, f"{f}.stored.block_hashes[{j}]")
                for j, h in enumerate(s.block_hashes)
            )
            parent = (
                block_hash_from_pb(s.parent_block_hash, f"{f}.stored.parent_block_hash")
                if s.HasField("parent_block_hash")
                else None
            )
            out.append(
                KvEvent(
                    kind=KvEventKind.STORED,
                    block_hashes=hashes,
                    parent_block_hash=parent,
                    token_count=_count(s.token_count, f"{f}.stored.token_count", MAX_TOKENS),
                    block_size_tokens=_count(
                        s.block_size_tokens, f"{f}.stored.block_size_tokens", MAX_BLOCK_SIZE_TOKENS
                    ),
                    tier=_tier(s.tier, f"{f}.stored.tier"),
                    group_index=_count(s.group_index, f"{f}.stored.group_index", 1 << 10),
                    session_id=SessionId(
                        _id(s.session_id, f"{f}.stored.session_id", required=False)
                    ),
                )
            )
        elif which == "removed":
            r = ev.removed
            hashes = tuple(
                block_hash_from_pb(h, f"{f}.removed.block_hashes[{j}]")
                for j, h in enumerate(r.block_hashes)
            )
            out.append(
                KvEvent(
                    kind=KvEventKind.REMOVED,
                    block_hashes=hashes,
                    tier=_tier(r.tier, f"{f}.removed.tier"),
                    group_index=_count(r.group_index, f"{f}.removed.group_index", 1 << 10),
                )
            )
        elif which == "all_cleared":
            tier = _tier(ev.all_cleared.tier, f"{f}.all_cleared.tier", allow_unspecified=True)
            out.append(KvEvent(kind=KvEventKind.ALL_CLEARED, tier=tier))
        else:
            raise Rejected(f, "one of stored, removed, all_cleared is required")
    return out


def pool_snapshot_from_pb(pb: worker_pb2.PoolSnapshot, field: str) -> PoolInventory:
    """Validated inventory."""
    sessions = []
    seen: set[str] = set()
    for i, s in enumerate(pb.sessions):
        f = f"{field}.sessions[{i}]"
        sid = _id(s.session_id, f"{f}.session_id")
        if sid in seen:
            raise Rejected(f"{f}.session_id", f"duplicate session {sid!r}")
        seen.add(sid)
        sessions.append(
            SessionResidency(
                session_id=SessionId(sid),
                tenant_id=TenantId(_id(s.tenant_id, f"{f}.tenant_id", MAX_SHORT_BYTES)),
                gpu_blocks=_count(s.gpu_blocks, f"{f}.gpu_blocks", MAX_BLOCKS),
                host_blocks=_count(s.host_blocks, f"{f}.host_blocks", MAX_BLOCKS),
                lease_remaining_s=_real(s.lease_remaining_s, f"{f}.lease_remaining_s", MAX_HINT_S),
                cached_tokens=_count(s.cached_tokens, f"{f}.cached_tokens", MAX_TOKENS),
            )
        )
    return PoolInventory(
        gpu_used_blocks=_count(pb.gpu_used_blocks, f"{field}.gpu_used_blocks", MAX_BLOCKS),
        host_used_blocks=_count(pb.host_used_blocks, f"{field}.host_used_blocks", MAX_BLOCKS),
        sessions=tuple(sessions),
        complete=pb.complete,
    )


def heartbeat_from_pb(pb: worker_pb2.Heartbeat, field: str) -> WorkerLoad:
    """Validated load figures."""
    return WorkerLoad(
        gpu_free_blocks=_count(pb.gpu_free_blocks, f"{field}.gpu_free_blocks", MAX_BLOCKS),
        host_free_blocks=_count(pb.host_free_blocks, f"{field}.host_free_blocks", MAX_BLOCKS),
        queued_prefill_tokens=_count(
            pb.queued_prefill_tokens, f"{field}.queued_prefill_tokens", MAX_TOKENS * 64
        ),
        running_steps=_count(pb.running_steps, f"{field}.running_steps", 1 << 20),
    )


def directive_ack_from_pb(
    pb: worker_pb2.DirectiveAck, field: str
) -> tuple[str, DirectiveOutcome, str]:
    """Validated (directive_id, outcome, reason)."""
    did = _id(pb.directive_id, f"{field}.directive_id", MAX_SHORT_BYTES)
    if pb.outcome not in {o.value for o in DirectiveOutcome}:
        raise Rejected(f"{field}.outcome", f"unknown outcome {pb.outcome}")
    reason = _id(pb.reason, f"{field}.reason", MAX_REASON_BYTES, required=False)
    return did, DirectiveOutcome(pb.outcome), reason


def directive_to_pb(d: RetentionDirective) -> worker_pb2.ServerMessage:
    """A directive as a downstream message."""
    return worker_pb2.ServerMessage(
        directive=worker_pb2.RetentionDirective(
            directive_id=d.directive_id,
            session_id=d.session_id,
            action=int(d.action),
            lease_ttl_s=d.lease_ttl_s,
            priority=d.priority,
            leader_epoch=d.leader_epoch,
            complete_within_s=d.complete_within_s,
            reason=d.reason,
        )
    )


# -- placement ----------------------------------------------------------------


def place_request_from_pb(pb: placement_pb2.PlaceRequest) -> PlaceRequest:
    """Validated PlaceRequest."""
    if pb.max_candidates > MAX_CANDIDATES:
        raise Rejected("max_candidates", f"must be at most {MAX_CANDIDATES}")
    if len(pb.candidate_worker_ids) > 4096:
        raise Rejected("candidate_worker_ids", "must list at most 4096 workers")
    if len(pb.prefix_block_hashes) > 1 << 16:
        raise Rejected("prefix_block_hashes", "must list at most 65536 hashes")
    return PlaceRequest(
        session_id=SessionId(_id(pb.session_id, "session_id")),
        tenant_id=TenantId(_id(pb.tenant_id, "tenant_id", MAX_SHORT_BYTES)),
        agent_type=_id(pb.agent_type, "agent_type", MAX_SHORT_BYTES, required=False) or "default",
        step_index=_count(pb.step_index, "step_index", MAX_STEP_INDEX),
        context_tokens=_count(pb.context_tokens, "context_tokens", MAX_TOKENS),
        new_tokens=_count(pb.new_tokens, "new_tokens", MAX_TOKENS),
        candidate_worker_ids=tuple(
            WorkerId(_id(w, f"candidate_worker_ids[{i}]"))
            for i, w in enumerate(pb.candidate_worker_ids)
        ),
        max_candidates=pb.max_candidates or 3,
        prefix_block_hashes=tuple(
            block_hash_from_pb(h, f"prefix_block_hashes[{i}]")
            for i, h in enumerate(pb.prefix_block_hashes)
        ),
    )


def placement_to_pb(p: Placement) -> placement_pb2.PlaceResponse:
    """Wire form of a Placement."""
    return placement_pb2.PlaceResponse(
        candidates=[
            placement_pb2.PlacementCandidate(
                worker_id=c.worker_id,
                endpoint=c.endpoint,
                expected_cached_tokens=c.expected_cached_tokens,
                score=c.score,
                cached_tier=int(c.cached_tier),
                kv_source_worker_id=c.kv_source_worker_id or "",
            )
            for c in p.candidates
        ],
        step_priority=p.step_priority,
        affinity_ttl_s=p.affinity_ttl_s,
        reason=p.reason,
    )


# -- admin ----------------------------------------------------------------------

TENANT_MUTABLE_FIELDS = (
    "display_name",
    "weight",
    "kv_quota_gpu_bytes",
    "kv_quota_host_bytes",
    "event_rate_limit_per_s",
    "max_concurrent_sessions",
    "slo_class",
)


def tenant_id_from_pb(value: str, field: str = "tenant_id") -> TenantId:
    """Validated tenant id: 1..128 bytes of [A-Za-z0-9._-]."""
    _id(value, field, MAX_SHORT_BYTES)
    if not all(c.isascii() and (c.isalnum() or c in "._-") for c in value):
        raise Rejected(field, "may only contain letters, digits, '.', '_' and '-'")
    return TenantId(value)


def tenant_from_pb(pb: admin_pb2.Tenant, field: str = "tenant") -> TenantSpec:
    """Validated TenantSpec (weight 0 means the default, 1)."""
    weight = _real(pb.weight, f"{field}.weight", 1e6) or 1.0
    return TenantSpec(
        tenant_id=tenant_id_from_pb(pb.tenant_id, f"{field}.tenant_id"),
        display_name=_id(pb.display_name, f"{field}.display_name", required=False),
        weight=weight,
        kv_quota_gpu_bytes=_count(pb.kv_quota_gpu_bytes, f"{field}.kv_quota_gpu_bytes", 1 << 62),
        kv_quota_host_bytes=_count(pb.kv_quota_host_bytes, f"{field}.kv_quota_host_bytes", 1 << 62),
        event_rate_limit_per_s=_real(
            pb.event_rate_limit_per_s, f"{field}.event_rate_limit_per_s", 1e9
        ),
        max_concurrent_sessions=_count(
            pb.max_concurrent_sessions, f"{field}.max_concurrent_sessions", 1 << 31
        ),
        slo_class=_id(pb.slo_class, f"{field}.slo_class", MAX_SHORT_BYTES, required=False),
    )


def tenant_to_pb(t: TenantSpec) -> admin_pb2.Tenant:
    """Wire form of a tenant."""
    return admin_pb2.Tenant(
        tenant_id=t.tenant_id,
        display_name=t.display_name,
        weight=t.weight,
        kv_quota_gpu_bytes=t.kv_quota_gpu_bytes,
        kv_quota_host_bytes=t.kv_quota_host_bytes,
        event_rate_limit_per_s=t.event_rate_limit_per_s,
        max_concurrent_sessions=t.max_concurrent_sessions,
        slo_class=t.slo_class,
    )


def cache_spec_to_pb(c: CacheSpec) -> types_pb2.CacheSpec:
    """Wire form of a CacheSpec."""
    return types_pb2.CacheSpec(
        block_size_tokens=c.block_size_tokens,
        bytes_per_token=c.bytes_per_token,
        gpu_capacity_blocks=c.gpu_capacity_blocks,
        host_capacity_blocks=c.host_capacity_blocks,
        hash_algo=c.hash_algo,
        prefill_tokens_per_s=c.prefill_tokens_per_s,
        host_link_bytes_per_s=c.host_link_bytes_per_s,
        decode_tokens_per_s=c.decode_tokens_per_s,
        hbm_bytes_per_s=c.hbm_bytes_per_s,
        kv_transfer_domain=c.kv_transfer_domain,
    )


def worker_to_pb(w: WorkerView) -> admin_pb2.WorkerInfo:
    """Wire form of a worker view."""
    s = w.spec
    return admin_pb2.WorkerInfo(
        worker_id=s.worker_id,
        epoch=s.epoch,
        endpoint=s.endpoint,
        model=s.model,
        engine_name=s.engine_name,
        cache_spec=cache_spec_to_pb(s.cache),
        connected=w.connected,
        draining=w.draining,
        gpu_used_blocks=w.gpu_used_blocks,
        sessions=w.sessions,
        running_steps=w.running_steps,
        queued_prefill_tokens=w.queued_prefill_tokens,
    )


def session_to_pb(s: SessionView) -> admin_pb2.SessionInfo:
    """Wire form of a session view."""
    return admin_pb2.SessionInfo(
        session_id=s.session_id,
        tenant_id=s.tenant_id,
        agent_type=s.agent_type,
        home_worker_id=s.home_worker_id or "",
        tier=int(s.tier),
        state=int(s.state),
        step_index=s.step_index,
        context_tokens=s.context_tokens,
        idle_s=s.idle_s,
        lease_remaining_s=s.lease_remaining_s,
        events=s.events,
    )


def stats_to_pb(v: ClusterStatsView, uptime_s: float) -> admin_pb2.ClusterStats:
    """Wire form of cluster stats."""
    return admin_pb2.ClusterStats(
        workers=v.workers,
        workers_connected=v.workers_connected,
        sessions_running=v.sessions_running,
        sessions_tool_wait=v.sessions_tool_wait,
        sessions_idle=v.sessions_idle,
        events_total=v.events_total,
        placements_total=v.placements_total,
        directives_total=v.directives_total,
        gpu_used_blocks=v.gpu_used_blocks,
        gpu_capacity_blocks=v.gpu_capacity_blocks,
        tenants=[
            admin_pb2.TenantStats(
                tenant_id=t.tenant_id,
                sessions=t.sessions,
                completed_sessions=t.completed_sessions,
                events=t.events,
                mean_slowdown=t.mean_slowdown,
                kv_gpu_bytes=t.kv_gpu_bytes,
                kv_host_bytes=t.kv_host_bytes,
            )
            for t in v.tenants
        ],
        uptime_s=uptime_s,
        leader_epoch=v.leader_epoch,
    )
