"""Rejected directives put residency back; kernels are compiled before any request."""

from __future__ import annotations

from typing import Any

from scheduler_service import engine_batch, kernels
from scheduler_service.domain import (
    DirectiveOutcome,
    EventId,
    EventKind,
    PlaceRequest,
    SessionEvent,
    SessionId,
    TenantId,
    Tier,
    WorkerId,
)
from scheduler_service.engine import Engine

K = EventKind


def test_a_rejected_offload_leaves_the_kv_on_the_gpu(script: Any) -> None:
    sc = script()
    sc.worker("w1", gpu_blocks=10_000, host_blocks=20_000)
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    sc.heartbeat(1.5, "w1", free_blocks=1_000, host_free=20_000)
    [off] = sc.event(
        2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="deploy", expected_tool_latency_s=120.0
    )
    assert off.action.name == "OFFLOAD_HOST"
    used_after_offload = sc.engine.worker_views()[0].gpu_used_blocks
    sc.engine.directive_acked(
        WorkerId("w1"), off.directive_id, DirectiveOutcome.REJECTED, "host full", 2.1
    )
    assert sc.engine.session_view(SessionId("s1"), 2.1).tier is Tier.GPU
    assert sc.engine.worker_views()[0].gpu_used_blocks == used_after_offload + 1_000
    # no prefetch of a copy that does not exist
    assert [
        d for t in range(3, 200) for d in sc.tick(float(t)) if d.action.name == "PREFETCH_GPU"
    ] == []
    # an applied ack, or an ack of an unknown id, changes nothing
    sc.engine.directive_acked(WorkerId("w1"), off.directive_id, DirectiveOutcome.APPLIED, "", 3.0)
    assert (
        sc.engine.acks[DirectiveOutcome.REJECTED] == 1
        and sc.engine.acks[DirectiveOutcome.APPLIED] == 1
    )


def test_a_rejected_lease_is_not_expired_later(script: Any) -> None:
    sc = script()
    sc.worker("w1")
    sc.event(1.0, "s1", K.STEP_START, 16_000)
    [ret] = sc.event(2.0, "s1", K.TOOL_CALL_WAIT, 16_000, tool_name="bash")
    sc.engine.directive_acked(WorkerId("w1"), ret.directive_id, DirectiveOutcome.REJECTED, "", 2.0)
    assert sc.engine.session_view(SessionId("s1"), 2.0).lease_remaining_s == 0.0
    assert sc.tick(1_000.0) == []


def _signatures() -> dict[str, int]:
    sigs = {
        name: len(getattr(kernels.NUMBA, name).signatures)
        for name in kernels.KernelSet.__slots__
        if name != "name"
    }
    sigs["apply_events"] = len(engine_batch.apply_events.signatures)
    sigs["fire_timers"] = len(engine_batch.fire_timers.signatures)
    return sigs


def test_no_kernel_compiles_on_the_request_path(script: Any) -> None:
    Engine()  # start-up warms every kernel
    before = _signatures()
    sc = script(high_watermark=0.3)
    sc.worker("w1", gpu_blocks=1_000, host_blocks=1_000)
    for i in range(6):
        sc.event(1.0, f"s{i}", K.STEP_START, 2_000)
        sc.event(2.0, f"s{i}", K.TOOL_CALL_WAIT, 2_000, tool_name="t", expected_tool_latency_s=5.0)
    sc.event(3.0, "big", K.STEP_START, 9_000)
    sc.tick(10.0)
    sc.engine.place(PlaceRequest(SessionId("s1"), TenantId("t1"), "coder", 1, 2_000), 10.0)
    # a batch the compiled path applies: tool returns, then steps that press the pool
    # (relief and eviction inside the kernel), then due timers
    batch = [
        *(_ev(i, K.TOOL_CALL_END, 2_000) for i in range(6)),
        *(_ev(i, K.STEP_START, 4_000) for i in range(6)),
    ]
    sc.engine.handle_batch(batch, 11.0)
    sc.tick(400.0)
    after = _signatures()
    assert before == after
    assert all(n == 1 for n in after.values()), after


def _ev(i: int, kind: EventKind, ctx: int) -> SessionEvent:
    return SessionEvent(
        EventId(f"b{i}-{kind.name}"),
        SessionId(f"s{i}"),
        TenantId("t1"),
        "coder",
        1,
        kind,
        ctx,
        worker_id=WorkerId("w1"),
    )


def test_directives_never_acked_cost_bounded_memory(script: Any, monkeypatch: Any) -> None:
    from scheduler_service import engine as engine_module

    monkeypatch.setattr(engine_module, "UNACKED_MEMORY", 4)
    sc = script()
    sc.worker("w1")
    for i in range(10):
        sc.event(1.0, f"s{i}", K.STEP_START, 1_000)
        sc.event(2.0, f"s{i}", K.TOOL_CALL_WAIT, 1_000, tool_name="t")
    assert sc.engine._unacked.ids() == ["d1-7", "d1-8", "d1-9", "d1-10"]
    # an ack for a forgotten directive is counted and otherwise ignored
    sc.engine.directive_acked(WorkerId("w1"), "d1-1", DirectiveOutcome.REJECTED, "", 3.0)  # type: ignore[arg-type]
    assert sc.engine.session_view(SessionId("s0"), 3.0).lease_remaining_s > 0


def test_agent_types_past_the_cap_share_one_graph(script: Any, monkeypatch: Any) -> None:
    from scheduler_service import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_AGENT_TYPES", 2)
    sc = script()
    sc.worker("w1")
    for i in range(5):
        sc.event(1.0, f"s{i}", K.STEP_START, 1_000, agent=f"agent{i}")
    assert sc.engine.agents.names == ["agent0", "agent1", "*other*"]
    assert len(sc.engine.graphs.graphs) == 3
    assert sc.engine.session_view(SessionId("s4"), 1.0).agent_type == "*other*"
