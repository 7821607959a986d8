"""KV sizing and cost figures against hand-computed values."""

from __future__ import annotations

import pytest

from scheduler_service import costs
from scheduler_service.costs import GPU_PROFILES, MODELS


def test_dense_models_bytes_per_token_by_hand() -> None:
    # 2 (K and V) × layers × kv_heads × head_dim × 2 bytes (bf16)
    assert costs.bytes_per_token(MODELS["Llama-3.1-8B"]) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert costs.bytes_per_token(MODELS["Llama-3.1-70B"]) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert costs.bytes_per_token(MODELS["Qwen2.5-32B"]) == 2 * 64 * 8 * 128 * 2 == 262_144


def test_gpt_oss_counts_only_full_attention_layers_per_token() -> None:
    m = MODELS["GPT-oss-120B"]
    # 18 full layers × 8 KV heads × 64 dims × 2 × 2 bytes = 36,864 B ≈ 0.035 MiB
    assert costs.bytes_per_token(m) == 36_864
    assert costs.bytes_per_token(m) / 2**20 == pytest.approx(0.0352, abs=1e-4)


def test_sliding_window_layers_cap_at_the_window() -> None:
    m = MODELS["GPT-oss-120B"]
    per_layer_group = 2 * 18 * 8 * 64 * 2
    # below the window both groups grow
    assert costs.kv_bytes(m, 100) == 2 * per_layer_group * 100
    # past it the sliding group holds exactly 128 tokens
    assert costs.kv_bytes(m, 24_000) == per_layer_group * 24_000 + per_layer_group * 128
    # a 24k-token session is ~850 MB, the figure the field quotes
    assert costs.kv_bytes(m, 24_000) == 36_864 * 24_128 == 889_454_592


def test_blocks_round_up() -> None:
    assert costs.blocks_for(0, 16) == 0
    assert costs.blocks_for(1, 16) == 1
    assert costs.blocks_for(16, 16) == 1
    assert costs.blocks_for(17, 16) == 2


def test_prefill_time_is_linear_plus_quadratic() -> None:
    # 10k tokens at 25k tokens/s: 0.4 s linear, × (1 + 10000/65536) with the attention term
    assert costs.prefill_time_s(10_000, 25_000) == pytest.approx(0.4 * (1 + 10_000 / 65_536))
    assert costs.prefill_time_s(65_536, 65_536) == pytest.approx(2.0)
    # doubling the length more than doubles the time
    assert costs.prefill_time_s(100_000, 25_000) > 2 * costs.prefill_time_s(50_000, 25_000)


def test_reload_time_is_bytes_over_link() -> None:
    # 100k tokens of an 8B model = 13.1 GB; over 40 GB/s ≈ 0.33 s
    nbytes = 100_000 * 131_072
    assert costs.reload_time_s(nbytes, 40e9) == pytest.approx(0.32768)


def test_gpu_profiles_memory_after_weights() -> None:
    h100 = GPU_PROFILES["H100-80G"]
    m8 = MODELS["Llama-3.1-8B"]
    usable = 80 * 2**30 * 0.9 - 2 * 2**30
    assert h100.kv_budget_bytes(m8) == int(usable - 8.03e9 * 2)
    # the field reports ~430-450k tokens for an 8B model on one H100
    assert 420_000 < h100.kv_capacity_tokens(m8) < 470_000
    # a 70B model does not fit one 80 GB GPU, but fits two
    m70 = MODELS["Llama-3.1-70B"]
    assert h100.kv_budget_bytes(m70) == 0
    assert h100.kv_capacity_tokens(m70, gpus=2) > 0
    assert GPU_PROFILES["H200-141G"].kv_budget_bytes(m8) > h100.kv_budget_bytes(m8)
    assert set(GPU_PROFILES) == {"A100-80G", "H100-80G", "H200-141G"}


def test_prefill_rate_from_flops() -> None:
    # 989 TFLOPs × 0.4 MFU / (2 × 8.03e9 FLOPs per token)
    rate = GPU_PROFILES["H100-80G"].prefill_tokens_per_s(MODELS["Llama-3.1-8B"])
    assert rate == pytest.approx(989e12 * 0.4 / (2 * 8.03e9))
    # 10k tokens in 0.3-0.5 s, as measured on H100s
    assert 0.3 < costs.prefill_time_s(10_000, rate) < 0.5


def test_the_kernels_price_prefill_exactly_as_the_cost_model() -> None:
    from scheduler_service.kernels.costs import prefill_s

    for tokens in (0.0, 1.0, 16_000.0, 131_072.0):
        for rate in (1.0, 20_000.0, 61_000.5):
            assert prefill_s(
                tokens, rate, costs.DEFAULT_ATTENTION_KNEE_TOKENS
            ) == costs.prefill_time_s(tokens, rate)
