"""The engine's directives, enforced by the reference block pool, do what they promise.

A fake worker: the client package's reference ``BlockPool`` is "the GPU"; the
test runs steps on it, reports the session events to a real ``Engine`` and
applies every directive back to the pool, acking the outcome.
"""

from __future__ import annotations

from kvsched_client.pool import BlockPool
from scheduler_service.domain import (
    Action,
    CacheSpec,
    DirectiveOutcome,
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

W = WorkerId("w1")
K = EventKind


class FakeWorker:
    """One worker: a BlockPool plus the engine it reports to."""

    def __init__(
        self, gpu_blocks: int, host_blocks: int, enforce: bool = True, **cfg: float
    ) -> None:
        self.enforce = enforce
        self.pool = BlockPool(gpu_capacity_blocks=gpu_blocks, host_capacity_blocks=host_blocks)
        self.engine = Engine(EngineConfig(**cfg))
        cache = CacheSpec(
            16,
            131_072,
            gpu_blocks,
            host_blocks,
            prefill_tokens_per_s=20_000.0,
            host_link_bytes_per_s=25e9,
        )
        self.engine.register_worker(WorkerSpec(W, 1, cache), 0.0)
        self.outcomes: list[tuple[str, str, str, bool]] = []

    def report(self, now: float, sid: str, kind: EventKind, ctx: int, **kw: object) -> None:
        ev = SessionEvent(
            EventId(f"{sid}-{now}-{kind}"),
            SessionId(sid),
            TenantId("t"),
            "coder",
            0,
            kind,
            ctx,
            worker_id=W,
            **kw,
        )  # type: ignore[arg-type]
        self.apply(self.engine.handle(ev, now).directives, now)

    def heartbeat(self, now: float) -> None:
        hb = self.pool.heartbeat(now)
        load = WorkerLoad(hb.gpu_free_blocks, hb.host_free_blocks, 0, hb.running_steps)
        self.apply(self.engine.heartbeat(W, load, now).directives, now)

    def tick(self, now: float) -> None:
        self.apply(self.engine.tick(now).directives, now)

    def apply(self, ds: tuple[RetentionDirective, ...], now: float) -> None:
        p = self.pool
        for d in ds if self.enforce else ():
            sid = d.session_id
            if d.action is Action.RETAIN_GPU:
                r = p.retain(sid, d.lease_ttl_s, d.priority, now)
            elif d.action is Action.OFFLOAD_HOST:
                r = p.offload(sid, now)
            elif d.action is Action.PREFETCH_GPU:
                r = p.prefetch(sid, now, d.lease_ttl_s, d.priority)
            elif d.action is Action.RELEASE:
                r = p.release(sid, now)
            else:
                r = p.evict_now(sid, now)
            self.outcomes.append((d.action.name, sid, d.reason, r.ok))
            outcome = DirectiveOutcome.APPLIED if r.ok else DirectiveOutcome.REJECTED
            self.engine.directive_acked(W, d.directive_id, outcome, r.reason, now)

    def step(self, now: float, sid: str, prompt: list[int], generated: int) -> int:
        """Run one step; returns the prompt tokens found on the GPU."""
        alloc = self.pool.start_step(sid, "t", prompt, now)
        self.report(now, sid, K.STEP_START, len(prompt))
        self.pool.end_step(sid, now + 0.5, [7] * generated)
        self.report(now + 0.5, sid, K.STEP_END, len(prompt) + generated)
        return alloc.gpu_hit_tokens


def _tokens(seed: int, n: int) -> list[int]:
    return [seed * 1_000_000 + i for i in range(n)]


def _lease_scenario(enforce: bool) -> int:
    # no pressure evictions here: the point is what the lease alone protects
    fw = FakeWorker(600, 0, enforce, low_watermark=0.0, high_watermark=0.0)
    a = _tokens(1, 3_200)
    fw.step(0.0, "a", a, 160)  # 210 blocks
    fw.report(1.0, "a", K.TOOL_CALL_WAIT, 3_360, tool_name="bash")
    # z runs and finishes: its blocks stay cached behind a's in the LRU queue
    fw.step(2.0, "z", _tokens(2, 6_080), 0)  # 380 blocks
    fw.report(2.5, "z", K.SESSION_FINISH, 6_080)
    # c takes 300 blocks while a waits on its tool
    fw.step(3.0, "c", _tokens(3, 4_800), 0)
    fw.report(4.0, "a", K.TOOL_CALL_END, 3_360)
    return fw.step(4.0, "a", a + [7] * 160 + _tokens(4, 100), 50)


def test_a_lease_keeps_the_prefix_through_another_sessions_step() -> None:
    # every full block of a's context survived on the GPU ...
    assert _lease_scenario(enforce=True) == 3_360
    # ... which it would not have without the lease: LRU took a's blocks first
    assert _lease_scenario(enforce=False) == 0


def test_offload_then_prefetch_brings_the_prefix_back_before_the_step() -> None:
    fw = FakeWorker(gpu_blocks=1_000, host_blocks=2_000)
    # teach the graph that "deploy" takes ~60 s
    for i in range(8):
        t = 10.0 + 100.0 * i
        sid = f"train{i}"
        fw.step(t, sid, _tokens(100 + i, 320), 0)
        fw.report(t + 1, sid, K.TOOL_CALL_WAIT, 320, tool_name="deploy")
        fw.heartbeat(t + 2)
        fw.report(t + 61, sid, K.TOOL_CALL_END, 320)
        fw.step(t + 61, sid, _tokens(100 + i, 400), 0)
        fw.report(t + 62, sid, K.SESSION_FINISH, 400)
    fw.outcomes.clear()
    t0 = 1_000.0
    a = _tokens(1, 6_400)
    fw.step(t0, "a", a, 0)  # 400 blocks
    fw.step(t0, "busy", _tokens(9, 7_680), 0)  # 480 blocks: the pool is 88% full
    fw.report(t0 + 1, "a", K.TOOL_CALL_WAIT, 6_400, tool_name="deploy")
    fw.report(
        t0 + 1, "busy", K.TOOL_CALL_WAIT, 7_680, tool_name="think", expected_tool_latency_s=1.0
    )
    assert fw.outcomes[0][:3] == ("OFFLOAD_HOST", "a", "tool_wait")
    assert fw.pool.residency("a", t0 + 1).host_blocks == 400
    for q in range(8, 244):
        fw.tick(t0 + q / 4)
    fw.report(t0 + 61, "a", K.TOOL_CALL_END, 6_400)
    hits = fw.step(t0 + 61, "a", a + _tokens(3, 200), 0)
    assert hits == 6_400
    assert [o[:3] for o in fw.outcomes if o[1] == "a"] == [
        ("OFFLOAD_HOST", "a", "tool_wait"),
        ("PREFETCH_GPU", "a", "prefetch_before_return"),
    ]
    assert all(o[3] for o in fw.outcomes)  # the pool applied every directive
