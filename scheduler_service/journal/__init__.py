"""Durability: every input that changes the engine is journaled before it is acked.

Records hold the original wire bytes and the ``now`` the engine saw, so a
restart rebuilds the exact state by replaying them through the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class RecordKind(StrEnum):
    """What a journal record holds (its payload's wire type)."""

    HELLO = "hello"  # worker_pb2.Hello
    WORKER_MESSAGE = "worker_message"  # worker_pb2.WorkerMessage (non-Hello bodies)
    DISCONNECT = "disconnect"  # empty payload
    REPORT_EVENTS = "report_events"  # placement_pb2.ReportSessionEventsRequest
    TICK = "tick"  # empty payload
    DRAIN_WORKER = "drain_worker"  # admin_pb2.DrainWorkerRequest
    TENANT_CREATE = "tenant_create"  # admin_pb2.Tenant
    TENANT_UPDATE = "tenant_update"  # admin_pb2.UpdateTenantRequest
    TENANT_DELETE = "tenant_delete"  # admin_pb2.DeleteTenantRequest
    LEADER = "leader"  # ASCII decimal fencing epoch of a new leader
    TOKEN_CREATE = "token_create"  # JSON: id, role, tenant, scrypt salt + digest (no secret)
    TOKEN_REVOKE = "token_revoke"  # UTF-8 token id
    TOKEN_BIND = "token_bind"  # JSON: token id, worker id


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled input."""

    kind: RecordKind
    now: float
    payload: bytes = b""
    worker_id: str = ""
    epoch: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What recovery found: records replayed and anything dropped from a torn tail."""

    records: int
    dropped: int
    last_now: float
    snapshot_now: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Serialized state covering every record appended before it."""

    now: float
    blob: bytes


class Journal(Protocol):
    """An append-only, group-committed journal."""

    def append(self, record: Record) -> asyncio.Future[None]:
        """Queue a record; the future resolves once it is durable."""
        ...

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once everything appended so far is durable."""
        ...

    def snapshot(self, snap: Snapshot) -> asyncio.Future[None]:
        """Queue a snapshot; once durable, the records it covers are dropped."""
        ...

    def load(self) -> tuple[Snapshot | None, Iterator[Record]]:
        """The latest snapshot and every intact record after it (call before appending)."""
        ...

    def load_report(self) -> LoadReport:
        """Figures from the last ``load``."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...


class MemoryJournal:
    """A journal that keeps nothing past the process (tests, benchmarks with --no-journal)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.latest: Snapshot | None = None

    def append(self, record: Record) -> asyncio.Future[None]:
        self.records.append(record)
        return self.barrier()

    def barrier(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def snapshot(self, snap: Snapshot) -> asyncio.Future[None]:
        self.latest = snap
        self.records.clear()
        return self.barrier()

    def load(self) -> tuple[Snapshot | None, Iterator[Record]]:
        return self.latest, iter(list(self.records))

    def load_report(self) -> LoadReport:
        last = self.records[-1].now if self.records else 0.0
        snap_now = self.latest.now if self.latest else None
        return LoadReport(
            records=len(self.records),
            dropped=0,
            last_now=max(last, snap_now or 0.0),
            snapshot_now=snap_now,
        )

    async def close(self) -> None:
        return None
