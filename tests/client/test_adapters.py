"""Engine adapters without their engines: vLLM lease ledger, SGLang priorities, TRT-LLM retention."""

from __future__ import annotations

import pytest

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.adapters.sglang import SglangRetention, session_close_event
from kvsched_client.adapters.trtllm import RetentionParams, retention_params
from kvsched_client.adapters.vllm import LeaseLedger, RequestSession

SPEC = types_pb2.CacheSpec(
    block_size_tokens=16, bytes_per_token=1, gpu_capacity_blocks=100, prefill_tokens_per_s=1.0
)


def d(
    sid: str, action: int, ttl_s: float = 0.0, priority: int = 0
) -> worker_pb2.RetentionDirective:
    return worker_pb2.RetentionDirective(
        directive_id="x", session_id=sid, action=action, lease_ttl_s=ttl_s, priority=priority
    )


def test_request_session_comes_from_kv_transfer_params() -> None:
    params = {
        "kvsched": {"session_id": "s1", "tenant_id": "t", "step_index": 3, "tool_name": "pytest"}
    }
    assert RequestSession.from_params(params) == RequestSession("s1", "t", "agent", 3, "pytest")
    assert RequestSession.from_params({"other": 1}) is None
    assert RequestSession.from_params(None) is None


def test_vllm_ledger_delays_free_only_under_a_lease_and_frees_at_ttl() -> None:
    ledger = LeaseLedger(SPEC, free_blocks=lambda: 40)
    assert ledger.apply_directive(d("s1", worker_pb2.RETAIN_GPU, ttl_s=5.0), now=0.0).ok
    assert ledger.request_finished("r1", "s1", 12, now=1.0) is True  # held past the step
    assert ledger.request_finished("r2", "s2", 3, now=1.0) is False  # no lease: freed now
    snap = ledger.snapshot(now=2.0)
    assert [(s.session_id, s.gpu_blocks, s.lease_remaining_s) for s in snap.sessions] == [
        ("s1", 12, 3.0)
    ]
    assert (snap.gpu_used_blocks, snap.complete) == (60, False)
    assert ledger.take_due(now=4.9) == []
    assert ledger.take_due(now=5.0) == ["r1"]
    assert ledger.take_due(now=6.0) == []  # handed back once


def test_vllm_ledger_release_next_step_and_offload_without_connector() -> None:
    ledger = LeaseLedger(SPEC)
    ledger.apply_directive(d("s1", worker_pb2.RETAIN_GPU, ttl_s=60.0), now=0.0)
    ledger.request_finished("r1", "s1", 4, now=0.0)
    ledger.step_started("s1")  # the next step holds its own refs
    assert ledger.take_due(now=1.0) == ["r1"]
    ledger.apply_directive(d("s2", worker_pb2.RETAIN_GPU, ttl_s=60.0), now=0.0)
    ledger.request_finished("r2", "s2", 4, now=0.0)
    assert ledger.apply_directive(d("s2", worker_pb2.RELEASE), now=1.0).ok
    assert ledger.take_due(now=1.0) == ["r2"]
    res = ledger.apply_directive(d("s3", worker_pb2.OFFLOAD_HOST), now=1.0)
    assert (res.ok, res.reason) == (False, "no offloading connector configured")
    assert (
        ledger.apply_directive(d("s3", worker_pb2.RETAIN_GPU), now=1.0).reason
        == "RETAIN_GPU needs lease_ttl_s > 0"
    )


def test_sglang_leased_sessions_are_evicted_last_and_evict_now_first() -> None:
    r = SglangRetention(SPEC)
    r.apply_directive(d("keep", worker_pb2.RETAIN_GPU, ttl_s=10.0, priority=2), now=0.0)
    r.apply_directive(d("drop", worker_pb2.EVICT_NOW), now=0.0)
    nodes = [("keep", 1.0), ("drop", 9.0), ("plain", 5.0), ("plain2", 2.0)]
    order = sorted(nodes, key=lambda n: r.eviction_key(n[0], n[1], now=1.0))
    assert [n[0] for n in order] == ["drop", "plain2", "plain", "keep"]
    order = sorted(nodes, key=lambda n: r.eviction_key(n[0], n[1], now=10.0))  # lease over
    assert [n[0] for n in order] == ["drop", "keep", "plain2", "plain"]
    assert r.expire_leases(now=10.0) == 1
    assert session_close_event("s", "t", aborted=True).kind == types_pb2.SESSION_ABORT


@pytest.mark.parametrize(
    ("action", "ttl", "prio", "want"),
    [
        (worker_pb2.RETAIN_GPU, 2.5, 0, RetentionParams(80, 2500)),
        (worker_pb2.RETAIN_GPU, 30.0, 50, RetentionParams(100, 30000)),
        (worker_pb2.RELEASE, 0.0, 0, RetentionParams(35, None)),
        (worker_pb2.OFFLOAD_HOST, 0.0, 0, RetentionParams(10, None)),
        (worker_pb2.EVICT_NOW, 0.0, 0, RetentionParams(0, None)),
    ],
)
def test_trtllm_retention_params(action: int, ttl: float, prio: int, want: RetentionParams) -> None:
    assert retention_params(d("s", action, ttl, prio)) == want


def test_trtllm_config_with_the_real_package_when_importable() -> None:
    pytest.importorskip("tensorrt_llm")
    from kvsched_client.adapters.trtllm import retention_config

    cfg = retention_config(d("s", worker_pb2.RETAIN_GPU, 1.0), prompt_tokens=128)
    assert cfg is not None


def test_vllm_connector_class_with_the_real_package_when_importable() -> None:
    pytest.importorskip("vllm")
    from kvsched_client.adapters.vllm import connector_class

    assert connector_class().__name__ == "KvschedConnector"


def test_bridge_cli_arguments() -> None:
    from kvsched_client.adapters.vllm_bridge import _parse

    a = _parse(["vllm", "--zmq", "tcp://h:5557", "--target", "k:50051", "--worker-id", "p/dp0",
                "--replay", "tcp://h:5558", "--dp-rank", "1"])  # fmt: skip
    assert (a.engine, a.zmq, a.replay, a.target, a.worker_id, a.dp_rank) == (
        "vllm",
        "tcp://h:5557",
        "tcp://h:5558",
        "k:50051",
        "p/dp0",
        1,
    )
    with pytest.raises(SystemExit):
        _parse(["vllm", "--target", "k:1"])  # --zmq is required
