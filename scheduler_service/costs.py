"""KV sizing and the cost model: every option priced in seconds of GPU time.

Bytes per token come from a model's attention layout (2 × layers × kv_heads ×
head_dim × dtype bytes, per attention group; sliding-window layers never hold
more than their window). Prefill time grows linearly with tokens plus an
attention term that grows with the square of the length; reload time is bytes
over the host link. Workers declare their own figures in ``CacheSpec``; the
functions here compute the same figures from a model and a GPU so tests,
simulations and defaults start from the field's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Prefill time doubles its linear part at this length: past it the attention
#: term (quadratic in length) dominates. 64k puts an 8B model on an H100 at
#: ~0.46 s for 10k tokens and ~10 s for 100k, inside the measured ranges.
DEFAULT_ATTENTION_KNEE_TOKENS = 65_536.0

#: Share of peak dense FLOPs a prefill reaches (model FLOPs utilisation).
DEFAULT_PREFILL_MFU = 0.4


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Layers that share one KV layout; ``sliding_window_tokens`` 0 means full attention."""

    layers: int
    kv_heads: int
    head_dim: int
    sliding_window_tokens: int = 0

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """KV bytes one token adds to this group (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What KV sizing and prefill speed need to know about a model."""

    name: str
    groups: tuple[AttentionGroup, ...]
    params: float
    dtype_bytes: int = 2
    active_params: float = 0.0  # mixture-of-experts: parameters used per token

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take on the GPU (at the KV dtype width)."""
        return int(self.params * self.dtype_bytes)

    @property
    def flops_per_token(self) -> float:
        """Dense forward FLOPs per prefill token (2 × active parameters)."""
        return 2.0 * (self.active_params or self.params)


def kv_bytes(model: ModelConfig, context_tokens: int) -> int:
    """KV bytes a sequence of ``context_tokens`` holds (windows capped)."""
    total = 0
    for g in model.groups:
        held = context_tokens
        if g.sliding_window_tokens:
            held = min(context_tokens, g.sliding_window_tokens)
        total += g.bytes_per_token(model.dtype_bytes) * held
    return total


def bytes_per_token(model: ModelConfig) -> int:
    """Marginal KV bytes per token of a long context (what a worker declares).

    # NOTE: sliding-window groups stop growing once the window is full, so for
    # the long contexts agents run they add nothing per token; only full
    # attention groups count.
    """
    return sum(
        g.bytes_per_token(model.dtype_bytes) for g in model.groups if not g.sliding_window_tokens
    )


def blocks_for(tokens: int, block_size_tokens: int) -> int:
    """Blocks needed for ``tokens`` (a partial block still takes a whole one)."""
    return -(-tokens // block_size_tokens) if tokens > 0 else 0


def prefill_time_s(
    tokens: float,
    prefill_tokens_per_s: float,
    attention_knee_tokens: float = DEFAULT_ATTENTION_KNEE_TOKENS,
) -> float:
    """Seconds to prefill ``tokens``: linear term plus the quadratic attention term."""
    linear = tokens / prefill_tokens_per_s
    return linear + linear * (tokens / attention_knee_tokens)


def reload_time_s(nbytes: float, host_link_bytes_per_s: float) -> float:
    """Seconds to move ``nbytes`` across the host link (either direction)."""
    return nbytes / host_link_bytes_per_s


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """One GPU kind: memory, dense bf16 FLOPs, host link."""

    name: str
    hbm_bytes: int
    dense_bf16_flops: float
    host_link_bytes_per_s: float
    memory_utilization: float = 0.9  # vLLM's gpu_memory_utilization default
    activation_reserve_bytes: int = 2 * 1024**3

    def kv_budget_bytes(self, model: ModelConfig, gpus: int = 1) -> int:
        """Bytes left for KV after weights and activations (tensor parallel over ``gpus``)."""
        usable = self.hbm_bytes * self.memory_utilization - self.activation_reserve_bytes
        return max(0, int(usable * gpus - model.weight_bytes))

    def kv_capacity_tokens(self, model: ModelConfig, gpus: int = 1) -> int:
        """Tokens of long-context KV the GPU(s) hold."""
        return self.kv_budget_bytes(model, gpus) // bytes_per_token(model)

    def prefill_tokens_per_s(
        self, model: ModelConfig, gpus: int = 1, mfu: float = DEFAULT_PREFILL_MFU
    ) -> float:
        """Linear-term prefill rate: useful FLOPs over FLOPs per token."""
        return self.dense_bf16_flops * gpus * mfu / model.flops_per_token


_GIB = 1024**3

#: Shipped GPU profiles. Host links are effective PCIe rates, not peaks.
GPU_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("A100-80G", 80 * _GIB, 312e12, 20e9),
        GpuProfile("H100-80G", 80 * _GIB, 989e12, 40e9),
        GpuProfile("H200-141G", 141 * _GIB, 989e12, 40e9),
    )
}


def _dense(name: str, layers: int, kv_heads: int, head_dim: int, params: float) -> ModelConfig:
    return ModelConfig(name, (AttentionGroup(layers, kv_heads, head_dim),), params)


#: Shipped model configs (bf16 KV). GPT-oss-120B alternates 128-token
#: sliding-window and full-attention layers; only the 18 full layers grow.
MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in (
        _dense("Llama-3.1-8B", 32, 8, 128, 8.03e9),
        _dense("Llama-3.1-70B", 80, 8, 128, 70.6e9),
        _dense("Qwen2.5-32B", 64, 8, 128, 32.8e9),
        ModelConfig(
            "GPT-oss-120B",
            (AttentionGroup(18, 8, 64), AttentionGroup(18, 8, 64, sliding_window_tokens=128)),
            params=117e9,
            active_params=5.1e9,
        ),
    )
}


def model(name: str) -> ModelConfig:
    """A shipped model config by name (KeyError lists nothing: names are in MODELS)."""
    return MODELS[name]


def session_rebuild_s(context_tokens: int, prefill_tokens_per_s: float) -> float:
    """GPU seconds to rebuild a session's whole context from scratch."""
    return prefill_time_s(float(context_tokens), prefill_tokens_per_s)
