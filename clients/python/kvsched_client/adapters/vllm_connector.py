"""The vLLM v1 KV connector class; importing this module imports vLLM.

Enable it with
`--kv-transfer-config '{"kv_connector": "KvschedConnector",
"kv_connector_module_path": "kvsched_client.adapters.vllm_connector",
"kv_role": "kv_both", "kv_connector_extra_config": {"kvsched_target": "HOST:PORT",
"worker_id": "pod-7/dp0", "endpoint": "HOST:8000"}}'`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.adapters.vllm import LeaseLedger, RequestSession

__all__ = ["build_connector_class"]  # and KvschedConnector, built on first access


def build_connector_class() -> type:
    """Returns KvschedConnector (defined against the installed vLLM)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    @dataclass
    class KvschedMetadata(KVConnectorMetadata):  # type: ignore[misc,unused-ignore]
        # Finished requests whose held blocks may be freed now.
        free_req_ids: list[str] = field(default_factory=list)

    class _KvschedConnector(KVConnectorBase_V1):  # type: ignore[misc,unused-ignore]
        """Delays freeing the blocks of leased sessions; reports session events."""

        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
            try:
                super().__init__(vllm_config, role, kv_cache_config)
            except TypeError:  # vLLM releases before kv_cache_config was passed
                super().__init__(vllm_config, role)
            extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
            self._sessions: dict[str, RequestSession] = {}
            self._seen_finished: set[str] = set()
            self._to_free: set[str] = set()
            self._client = None
            self._lock = threading.RLock()
            self._ledger = LeaseLedger(_cache_spec(vllm_config, kv_cache_config))
            if role == KVConnectorRole.SCHEDULER and extra.get("kvsched_target"):
                from kvsched_client.worker import SyncWorkerClient

                hello = worker_pb2.Hello(
                    worker_id=str(extra.get("worker_id") or "vllm-0"),
                    epoch=int(extra.get("epoch") or time.time()),
                    dp_rank=int(vllm_config.parallel_config.data_parallel_rank or 0),
                    endpoint=str(extra.get("endpoint") or ""),
                    engine_name="vllm",
                    model=str(vllm_config.model_config.model),
                )
                self._client = SyncWorkerClient(
                    str(extra["kvsched_target"]), hello, self._ledger, pool_lock=self._lock,
                    collect_pool_events=False, token=extra.get("token") or None,
                )  # fmt: skip
                self._client.start()

        # -- scheduler side ----------------------------------------------------------------

        def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
            return 0, False  # retention only: no external KV to load

        def update_state_after_alloc(self, request: Any, blocks: Any, n_external: int) -> None:
            s = RequestSession.from_params(getattr(request, "kv_transfer_params", None))
            if s is None or request.request_id in self._sessions:
                return
            self._sessions[request.request_id] = s
            with self._lock:
                self._ledger.running.add(request.request_id)
                self._ledger.step_started(s.session_id)
            self._report(s, types_pb2.STEP_START, request)

        def build_connector_meta(self, scheduler_output: Any) -> Any:
            with self._lock:
                due = self._ledger.take_due(time.monotonic())
            return KvschedMetadata(free_req_ids=due)

        def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, Any]:
            s = self._sessions.pop(request.request_id, None)
            if s is None:
                return False, None
            self._report(s, types_pb2.STEP_END, request)
            if s.tool_name:
                self._report(s, types_pb2.TOOL_CALL_WAIT, request)
            n_blocks = (
                len(block_ids[0])
                if block_ids and isinstance(block_ids[0], list)
                else len(block_ids)
            )
            with self._lock:
                delay = self._ledger.request_finished(
                    request.request_id, s.session_id, n_blocks, time.monotonic()
                )
            return delay, None

        def _report(self, s: RequestSession, kind: int, request: Any) -> None:
            if self._client is None:
                return
            from kvsched_client.worker import session_event

            ctx = int(getattr(request, "num_tokens", 0) or 0)
            self._client.report(
                session_event(
                    s.session_id, kind, tenant_id=s.tenant_id, agent_type=s.agent_type,
                    step_index=s.step_index, context_tokens=ctx,
                    tool_name=s.tool_name if kind == types_pb2.TOOL_CALL_WAIT else "",
                )
            )  # fmt: skip

        # -- worker side -------------------------------------------------------------------

        def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
            return None

        def wait_for_layer_load(self, layer_name: str) -> None:
            return None

        def save_kv_layer(
            self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw: Any
        ) -> None:
            return None

        def wait_for_save(self) -> None:
            return None

        def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
            # NOTE: vLLM only accepts ids it passed in here (now or earlier), so a
            # release is handed back once its request has been seen finishing.
            self._seen_finished |= finished_req_ids
            self._to_free.update(getattr(self._connector_metadata, "free_req_ids", ()))
            free = self._to_free & self._seen_finished
            self._seen_finished -= free
            self._to_free -= free
            return (free or None), None

        def shutdown(self) -> None:
            if self._client is not None:
                self._client.stop()

    _KvschedConnector.__name__ = _KvschedConnector.__qualname__ = "KvschedConnector"
    return _KvschedConnector


def _cache_spec(vllm_config: Any, kv_cache_config: Any) -> types_pb2.CacheSpec:
    cache = vllm_config.cache_config
    n_blocks = int(getattr(kv_cache_config, "num_blocks", 0) or cache.num_gpu_blocks or 1)
    return types_pb2.CacheSpec(
        block_size_tokens=int(cache.block_size),
        bytes_per_token=1,  # refined by the operator's cache_spec when known
        gpu_capacity_blocks=n_blocks,
        hash_algo=str(getattr(cache, "prefix_caching_hash_algo", "sha256")),
        prefill_tokens_per_s=10_000.0,
    )


def __getattr__(name: str) -> Any:
    # vLLM loads `kv_connector_module_path`.KvschedConnector; build it on first access.
    if name == "KvschedConnector":
        cls = build_connector_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
