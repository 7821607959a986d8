"""Domain types: what the engine reads and returns.

Plain frozen dataclasses and enums. Protobuf stops at ``scheduler_service.api``;
nothing here (or in the engine, graph or kernels) imports generated code. Enum
values match the wire enums of kvsched.v1 so the boundary converts by value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, NewType

WorkerId = NewType("WorkerId", str)
SessionId = NewType("SessionId", str)
TenantId = NewType("TenantId", str)
EventId = NewType("EventId", str)
DirectiveId = NewType("DirectiveId", str)

DEFAULT_TENANT = TenantId("default")


class EventKind(IntEnum):
    """What happened in an agent session (kvsched.v1.SessionEventKind)."""

    STEP_START = 1
    TOOL_CALL_WAIT = 2
    TOOL_CALL_END = 3
    STEP_END = 4
    SESSION_FINISH = 5
    SESSION_ABORT = 6


class Tier(IntEnum):
    """Where KV blocks live (kvsched.v1.Tier); NONE means nowhere."""

    NONE = 0
    GPU = 1
    HOST = 2
    DISK = 3
    EXTERNAL = 4


class Action(IntEnum):
    """Retention directive actions (kvsched.v1.RetentionAction)."""

    RETAIN_GPU = 1
    OFFLOAD_HOST = 2
    PREFETCH_GPU = 3
    RELEASE = 4
    EVICT_NOW = 5


class SessionState(IntEnum):
    """Lifecycle of a session as the scheduler sees it (kvsched.v1.SessionState)."""

    RUNNING = 1
    TOOL_WAIT = 2
    IDLE = 3
    DONE = 4


class DirectiveOutcome(IntEnum):
    """What a worker did with a directive (kvsched.v1.DirectiveOutcome)."""

    APPLIED = 1
    REJECTED = 2
    STALE_EPOCH = 3


class Rejected(ValueError):
    """Input the engine refuses; ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class StaleEpoch(Exception):
    """A worker presented an epoch older than one the scheduler already saw."""

    def __init__(self, worker_id: str, presented: int, current: int) -> None:
        super().__init__(
            f"worker {worker_id!r} presented epoch {presented}, but epoch {current} is current"
        )
        self.worker_id = worker_id
        self.presented = presented
        self.current = current


class TenantLimitExceeded(Exception):
    """A tenant is at one of its configured limits; the same request may succeed later."""

    def __init__(self, tenant_id: str, limit_name: str, limit: int, current: int) -> None:
        super().__init__(
            f"tenant {tenant_id!r} is at its {limit_name} limit of {limit} (now {current})"
        )
        self.tenant_id = tenant_id
        self.limit_name = limit_name
        self.limit = limit
        self.current = current


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """A worker's KV cache as declared in Hello."""

    block_size_tokens: int
    bytes_per_token: int
    gpu_capacity_blocks: int
    host_capacity_blocks: int = 0
    hash_algo: str = "sha256"
    prefill_tokens_per_s: float = 20_000.0
    host_link_bytes_per_s: float = 25e9
    decode_tokens_per_s: float = 0.0  # one sequence alone; 0 = unknown (learned)
    hbm_bytes_per_s: float = 0.0  # KV read bandwidth of decode; 0 = unknown
    kv_transfer_domain: str = ""  # workers of one domain can load each other's KV


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Identity and cache of one worker replica (one stream, one DP rank)."""

    worker_id: WorkerId
    epoch: int
    cache: CacheSpec
    dp_rank: int = 0
    endpoint: str = ""
    engine_name: str = ""
    engine_version: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """Load figures from a worker heartbeat."""

    gpu_free_blocks: int
    host_free_blocks: int = 0
    queued_prefill_tokens: int = 0
    running_steps: int = 0


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One event of an agent session, as reported by ``worker_id``."""

    event_id: EventId
    session_id: SessionId
    tenant_id: TenantId
    agent_type: str
    step_index: int
    kind: EventKind
    context_tokens: int
    new_tokens: int = 0
    tool_name: str = ""
    expected_tool_latency_s: float = 0.0
    declared_next_step: str = ""
    last_step: bool = False
    event_time_s: float = 0.0
    worker_id: WorkerId = WorkerId("")


class KvEventKind(IntEnum):
    """The three KV block events vLLM publishes."""

    STORED = 1
    REMOVED = 2
    ALL_CLEARED = 3


@dataclass(frozen=True, slots=True)
class KvEvent:
    """A KV block event; hashes keep their engine form (bytes or int)."""

    kind: KvEventKind
    block_hashes: tuple[bytes | int, ...] = ()
    parent_block_hash: bytes | int | None = None
    token_count: int = 0
    block_size_tokens: int = 0
    tier: Tier = Tier.GPU
    group_index: int = 0
    session_id: SessionId = SessionId("")


@dataclass(frozen=True, slots=True)
class SessionResidency:
    """What a worker holds for one session (from a PoolSnapshot)."""

    session_id: SessionId
    tenant_id: TenantId
    gpu_blocks: int
    host_blocks: int = 0
    lease_remaining_s: float = 0.0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PoolInventory:
    """A worker's full inventory; the worker is the truth about residency."""

    gpu_used_blocks: int
    host_used_blocks: int
    sessions: tuple[SessionResidency, ...] = ()
    complete: bool = True


@dataclass(frozen=True, slots=True)
class PlaceRequest:
    """A step about to be scheduled."""

    session_id: SessionId
    tenant_id: TenantId
    agent_type: str
    step_index: int
    context_tokens: int
    new_tokens: int = 0
    candidate_worker_ids: tuple[WorkerId, ...] = ()
    max_candidates: int = 3
    prefix_block_hashes: tuple[bytes | int, ...] = ()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker a step may run on."""

    worker_id: WorkerId
    endpoint: str
    expected_cached_tokens: int
    score: float
    cached_tier: Tier = Tier.NONE
    # the worker holding the KV this one would load (same kv_transfer_domain)
    kv_source_worker_id: WorkerId | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a step should run: candidates in order, [0] is the primary."""

    candidates: tuple[Candidate, ...]
    step_priority: int = 0
    affinity_ttl_s: float = 0.0
    reason: str = ""


class RetentionDirective(NamedTuple):
    """A retention decision for one session, addressed to ``worker_id``.

    # NOTE: a NamedTuple, not a frozen dataclass: the engine builds ~0.7 of
    # these per event, and a tuple builds in a third of the time.
    """

    directive_id: DirectiveId
    worker_id: WorkerId
    session_id: SessionId
    action: Action
    lease_ttl_s: float = 0.0
    priority: int = 0
    leader_epoch: int = 0
    complete_within_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Decisions:
    """Everything the engine decided in answer to one call."""

    directives: tuple[RetentionDirective, ...] = ()
    resync_workers: tuple[WorkerId, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.directives or self.resync_workers)


NO_DECISIONS = Decisions()


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """A tenant's settings (weights, quotas, limits)."""

    tenant_id: TenantId
    display_name: str = ""
    weight: float = 1.0
    kv_quota_gpu_bytes: int = 0
    kv_quota_host_bytes: int = 0
    event_rate_limit_per_s: float = 0.0
    max_concurrent_sessions: int = 0
    slo_class: str = ""


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker as operators see it."""

    spec: WorkerSpec
    connected: bool
    draining: bool
    gpu_used_blocks: int
    sessions: int
    running_steps: int
    queued_prefill_tokens: int


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as operators see it."""

    session_id: SessionId
    tenant_id: TenantId
    agent_type: str
    home_worker_id: WorkerId | None
    tier: Tier
    state: SessionState
    step_index: int
    context_tokens: int
    idle_s: float
    lease_remaining_s: float
    events: int


@dataclass(frozen=True, slots=True)
class TenantStatsView:
    """Per-tenant figures."""

    tenant_id: TenantId
    sessions: int
    completed_sessions: int
    events: int
    mean_slowdown: float
    kv_gpu_bytes: int = 0  # KV its sessions hold on GPUs
    kv_host_bytes: int = 0  # and on host tiers


@dataclass(frozen=True, slots=True)
class ClusterStatsView:
    """Cluster-wide figures."""

    workers: int
    workers_connected: int
    sessions_running: int
    sessions_tool_wait: int
    sessions_idle: int
    events_total: int
    placements_total: int
    directives_total: int
    gpu_used_blocks: int
    gpu_capacity_blocks: int
    tenants: tuple[TenantStatsView, ...] = field(default_factory=tuple)
    leader_epoch: int = 0
