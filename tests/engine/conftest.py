"""Scripted-session helpers: a real Engine driven with explicit times."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from scheduler_service.domain import (
    CacheSpec,
    EventId,
    EventKind,
    RetentionDirective,
    SessionEvent,
    SessionId,
    TenantId,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine, EngineConfig


@dataclass
class Script:
    """Drives one engine: events at explicit times, directives collected as (action, session, reason)."""

    engine: Engine
    log: list[RetentionDirective] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def worker(
        self,
        wid: str,
        gpu_blocks: int = 10_000,
        host_blocks: int = 0,
        epoch: int = 1,
        now: float = 0.0,
        prefill_tokens_per_s: float = 20_000.0,
        link_bytes_per_s: float = 25e9,
        kv_domain: str = "",
    ) -> None:
        cache = CacheSpec(
            block_size_tokens=16,
            bytes_per_token=131_072,
            gpu_capacity_blocks=gpu_blocks,
            host_capacity_blocks=host_blocks,
            prefill_tokens_per_s=prefill_tokens_per_s,
            host_link_bytes_per_s=link_bytes_per_s,
            kv_transfer_domain=kv_domain,
        )
        self.engine.register_worker(
            WorkerSpec(WorkerId(wid), epoch, cache, endpoint=f"{wid}:9"), now
        )

    def event(
        self,
        now: float,
        sid: str,
        kind: EventKind,
        ctx: int,
        worker: str = "w1",
        tenant: str = "t1",
        agent: str = "coder",
        **kw: object,
    ) -> list[RetentionDirective]:
        ev = SessionEvent(
            event_id=EventId(f"e{next(self._ids)}"),
            session_id=SessionId(sid),
            tenant_id=TenantId(tenant),
            agent_type=agent,
            step_index=0,
            kind=kind,
            context_tokens=ctx,
            worker_id=WorkerId(worker),
            **kw,  # type: ignore[arg-type]
        )
        return self._keep(self.engine.handle(ev, now).directives)

    def heartbeat(
        self, now: float, wid: str, free_blocks: int, queued: int = 0, host_free: int = 0
    ) -> list[RetentionDirective]:
        load = WorkerLoad(
            gpu_free_blocks=free_blocks, host_free_blocks=host_free, queued_prefill_tokens=queued
        )
        return self._keep(self.engine.heartbeat(WorkerId(wid), load, now).directives)

    def tick(self, now: float) -> list[RetentionDirective]:
        return self._keep(self.engine.tick(now).directives)

    def _keep(self, ds: tuple[RetentionDirective, ...]) -> list[RetentionDirective]:
        self.log.extend(ds)
        return list(ds)


@pytest.fixture
def script() -> Callable[..., Script]:
    def make(**cfg: object) -> Script:
        return Script(Engine(EngineConfig(**cfg)))  # type: ignore[arg-type]

    return make
