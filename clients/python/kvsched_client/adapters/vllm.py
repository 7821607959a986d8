"""vLLM integration: KV-event decoding and bridge (see vllm_bridge), v1 KV connector."""

from kvsched_client.adapters.vllm_events import decode_kv_events

__all__ = ["decode_kv_events"]
