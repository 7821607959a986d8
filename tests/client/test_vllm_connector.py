"""The vLLM connector's flow, with a stand-in for vLLM's KVConnectorBase_V1 module.

The stand-in mirrors the parts of vllm/distributed/kv_transfer/kv_connector/v1/base.py
the connector uses; the real class is exercised in test_adapters when vLLM is installed.
"""

from __future__ import annotations

import enum
import sys
import types
from abc import ABC
from dataclasses import dataclass, field

import pytest

from kvsched_client._proto.kvsched.v1 import worker_pb2


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class KVConnectorMetadata(ABC):  # noqa: B024
    pass


class KVConnectorBase_V1(ABC):  # noqa: B024
    def __init__(self, vllm_config, role, kv_cache_config) -> None:
        self._connector_metadata = None
        self._vllm_config = vllm_config
        self._role = role

    def bind_connector_metadata(self, meta) -> None:
        self._connector_metadata = meta


@dataclass
class Request:
    request_id: str
    kv_transfer_params: dict | None = None
    num_tokens: int = 100


@dataclass
class Config:
    kv_transfer_config: object = field(
        default_factory=lambda: types.SimpleNamespace(kv_connector_extra_config={})
    )
    cache_config: object = field(
        default_factory=lambda: types.SimpleNamespace(block_size=16, num_gpu_blocks=100)
    )
    parallel_config: object = field(
        default_factory=lambda: types.SimpleNamespace(data_parallel_rank=0)
    )
    model_config: object = field(default_factory=lambda: types.SimpleNamespace(model="m"))


@pytest.fixture
def connector_cls(monkeypatch):
    if "vllm" in sys.modules or _vllm_installed():
        pytest.skip("the real vLLM is installed; see test_adapters")
    base = types.ModuleType("vllm.distributed.kv_transfer.kv_connector.v1.base")
    base.KVConnectorBase_V1 = KVConnectorBase_V1
    base.KVConnectorMetadata = KVConnectorMetadata
    base.KVConnectorRole = KVConnectorRole
    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer",
             "vllm.distributed.kv_transfer.kv_connector", "vllm.distributed.kv_transfer.kv_connector.v1"]  # fmt: skip
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    from kvsched_client.adapters.vllm_connector import build_connector_class

    return build_connector_class()


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def params(sid: str, tool: str = "") -> dict:
    return {"kvsched": {"session_id": sid, "tenant_id": "t", "tool_name": tool}}


def test_leased_request_blocks_are_freed_only_when_the_lease_ends(connector_cls) -> None:
    sched = connector_cls(Config(), KVConnectorRole.SCHEDULER, None)
    worker = connector_cls(Config(), KVConnectorRole.WORKER, None)
    r1 = Request("r1", params("s1", tool="pytest"))
    assert sched.get_num_new_matched_tokens(r1, 0) == (0, False)
    sched.update_state_after_alloc(r1, None, 0)
    assert sched._ledger.running == {"r1"}
    # kvsched answers the tool wait with a lease (WorkerClient calls this on its thread).
    d = worker_pb2.RetentionDirective(
        directive_id="d1", session_id="s1", action=worker_pb2.RETAIN_GPU, lease_ttl_s=60.0
    )
    assert sched._ledger.apply_directive(d, now=0.0).ok
    sched._ledger._leases["s1"].expiry_s = float("inf")  # keep it for the test's duration
    delay, _ = sched.request_finished(r1, ([1, 2, 3],))
    assert delay is True
    assert sched.request_finished(Request("r9"), ([4],)) == (False, None)  # no session: freed
    # Worker side: vLLM reports r1 finished; nothing is released yet.
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    assert worker.get_finished({"r1"}) == (None, None)
    # The session's next step starts: the held request is handed back exactly once.
    sched.update_state_after_alloc(Request("r2", params("s1")), None, 0)
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    assert worker.get_finished(set()) == ({"r1"}, None)
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    assert worker.get_finished(set()) == (None, None)


def test_a_release_that_arrives_before_the_worker_saw_the_finish_waits_for_it(
    connector_cls,
) -> None:
    sched = connector_cls(Config(), KVConnectorRole.SCHEDULER, None)
    worker = connector_cls(Config(), KVConnectorRole.WORKER, None)
    r1 = Request("r1", params("s1"))
    sched.update_state_after_alloc(r1, None, 0)
    d = worker_pb2.RetentionDirective(
        directive_id="d1", session_id="s1", action=worker_pb2.RETAIN_GPU, lease_ttl_s=1e9
    )
    sched._ledger.apply_directive(d, now=0.0)
    assert sched.request_finished(r1, [1, 2])[0] is True
    d2 = worker_pb2.RetentionDirective(
        directive_id="d2", session_id="s1", action=worker_pb2.RELEASE
    )
    sched._ledger.apply_directive(d2, now=0.0)
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    assert worker.get_finished(set()) == (None, None)  # vLLM has not reported r1 yet
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    assert worker.get_finished({"r1"}) == ({"r1"}, None)
