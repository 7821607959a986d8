"""TensorRT-LLM integration: a directive as a `KvCacheRetentionConfig`.

TensorRT-LLM takes retention per request: a priority (0..100, default 35) and a
duration after which the priority reverts, for token ranges of the prompt and for
decoded tokens. RETAIN_GPU maps to a high priority for exactly the lease TTL (so
the engine itself ends the lease), EVICT_NOW to the lowest priority, RELEASE and
OFFLOAD_HOST to a low one (with a host tier TensorRT-LLM offloads low-priority
blocks there before dropping them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kvsched_client._proto.kvsched.v1 import worker_pb2

__all__ = ["RetentionParams", "retention_config", "retention_params"]

DEFAULT_PRIORITY = 35
RETAIN_BASE_PRIORITY = 80
OFFLOAD_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class RetentionParams:
    """Priority (0..100) and how long it lasts (None = until evicted)."""

    priority: int
    duration_ms: int | None


def retention_params(directive: worker_pb2.RetentionDirective) -> RetentionParams:
    """Returns the TensorRT-LLM retention for one directive."""
    a = directive.action
    if a == worker_pb2.RETAIN_GPU:
        if not directive.lease_ttl_s > 0:
            raise ValueError("RETAIN_GPU needs lease_ttl_s > 0")
        # Directive priorities are relative; keep them inside 80..100.
        prio = max(RETAIN_BASE_PRIORITY, min(100, RETAIN_BASE_PRIORITY + directive.priority))
        return RetentionParams(prio, max(1, round(directive.lease_ttl_s * 1000)))
    if a == worker_pb2.EVICT_NOW:
        return RetentionParams(0, None)
    if a == worker_pb2.OFFLOAD_HOST:
        return RetentionParams(OFFLOAD_PRIORITY, None)
    if a in (worker_pb2.RELEASE, worker_pb2.PREFETCH_GPU):
        return RetentionParams(DEFAULT_PRIORITY, None)
    raise ValueError(f"unknown action {a}")


def retention_config(directive: worker_pb2.RetentionDirective, prompt_tokens: int) -> Any:
    """Returns a `tensorrt_llm` KvCacheRetentionConfig covering the whole prompt."""
    try:
        from tensorrt_llm.llmapi import KvCacheRetentionConfig
    except ImportError:
        from tensorrt_llm.bindings.executor import KvCacheRetentionConfig

    p = retention_params(directive)
    # The bindings take std::chrono durations, i.e. timedelta on the Python side.
    duration = None if p.duration_ms is None else timedelta(milliseconds=p.duration_ms)
    token_range = KvCacheRetentionConfig.TokenRangeRetentionConfig(
        0, prompt_tokens, p.priority, duration
    )
    return KvCacheRetentionConfig([token_range], p.priority, duration)
