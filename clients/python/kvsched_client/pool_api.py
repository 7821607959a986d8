"""The `KVPool` protocol an engine adapter implements, and the pool's result records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2

__all__ = ["BlockPoolStats", "DirectiveResult", "KVPool", "PoolExhaustedError", "StepAllocation"]


class PoolExhaustedError(RuntimeError):
    """Running steps hold every GPU block; the engine must queue or preempt."""


@dataclass(frozen=True, slots=True)
class DirectiveResult:
    """What applying one directive did."""

    outcome: int  # a worker_pb2.DirectiveOutcome value
    reason: str = ""
    # When the transfer the directive started is done (== now when none started).
    ready_s: float | None = None

    @staticmethod
    def applied(ready_s: float | None = None) -> DirectiveResult:
        """Returns an APPLIED result."""
        return DirectiveResult(worker_pb2.DIRECTIVE_APPLIED, "", ready_s)

    @staticmethod
    def rejected(reason: str) -> DirectiveResult:
        """Returns a REJECTED result with its reason."""
        return DirectiveResult(worker_pb2.DIRECTIVE_REJECTED, reason)

    @property
    def ok(self) -> bool:
        """True when the directive was applied."""
        return self.outcome == worker_pb2.DIRECTIVE_APPLIED


@dataclass(frozen=True, slots=True)
class StepAllocation:
    """Where a step's prompt tokens came from."""

    gpu_hit_tokens: int
    host_hit_tokens: int
    computed_tokens: int
    # When the host-to-GPU reload of the host hits is done (== now when none).
    ready_s: float


@dataclass(slots=True)
class BlockPoolStats:
    """Counters since the pool was built (blocks unless named otherwise)."""

    gpu_hit_blocks: int = 0
    host_hit_blocks: int = 0
    computed_blocks: int = 0
    evicted_blocks: int = 0
    host_evicted_blocks: int = 0
    offloaded_blocks: int = 0
    prefetched_blocks: int = 0
    leases_expired: int = 0
    leases_broken: int = 0


class KVPool(Protocol):
    """What WorkerClient needs from an engine's KV cache."""

    def cache_spec(self) -> types_pb2.CacheSpec:
        """Returns the cache declared in Hello."""
        ...

    def apply_directive(
        self, directive: worker_pb2.RetentionDirective, now: float
    ) -> DirectiveResult:
        """Enforces one directive; returns whether it was applied and why not."""
        ...

    def expire_leases(self, now: float) -> int:
        """Ends every lease whose TTL has passed; returns how many ended."""
        ...

    def snapshot(self, now: float) -> worker_pb2.PoolSnapshot:
        """Returns the full residency inventory."""
        ...

    def heartbeat(self, now: float) -> worker_pb2.Heartbeat:
        """Returns the load figures for a heartbeat."""
        ...

    def take_kv_events(self) -> list[types_pb2.KvEvent]:
        """Returns and forgets the KV events emitted since the last call."""
        ...
