"""Kernel: score every candidate worker for a step and keep the top k.

A worker's cached prefix is the session's own KV on its home (GPU or host
tier), or the run of the prompt's blocks the prefix index found there (GPU),
whichever is longer. A worker in the home's KV-transfer domain (``kv_domain``
equal and not -1) can instead load the session's KV from the home, when that
saves more than its own prefix does: through the host tier, at one link
crossing from the home's host tier, two from its GPU (its link out, this
worker's in).

Score (seconds, higher is better) = prefill time the cached prefix saves there,
weighted by ``1 + rebuild_weight`` (leaving the home also costs the fleet the
rebuild's GPU time, not only this step its wait) − expected queue wait (the
queue the worker last reported plus what Place sent it since) − the rebuild cost of the evictions the step would force
− a best-fit slack term (tight fits first, so big holes stay for big sessions)
+ a small affinity bonus on the home worker. Ties go to the lower slot, so the
result equals a stable sort by (−score, slot).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scheduler_service.kernels.costs import prefill_s

TIER_GPU = 1
TIER_HOST = 2
#: ``out_tier`` of a worker that would load the KV from the home's GPU / host tier
TIER_PEER_GPU = 3
TIER_PEER_HOST = 4


@njit(cache=True)
def place_topk(
    allowed: np.ndarray,
    gpu_cap_blocks: np.ndarray,
    gpu_used_blocks: np.ndarray,
    queued_prefill_tokens: np.ndarray,
    placed_tokens: np.ndarray,
    prefix_blocks: np.ndarray,
    prefill_tokens_per_s: np.ndarray,
    block_size_tokens: np.ndarray,
    bytes_per_token: np.ndarray,
    host_link_bytes_per_s: np.ndarray,
    kv_domain: np.ndarray,
    n_workers: int,
    home: int,
    home_tier: int,
    cached_tokens: int,
    step_tokens: int,
    knee_tokens: float,
    evict_cost_factor: float,
    bestfit_weight_s: float,
    affinity_bonus_s: float,
    rebuild_weight: float,
    k: int,
    out_slots: np.ndarray,
    out_scores: np.ndarray,
    out_cached: np.ndarray,
    out_tier: np.ndarray,
) -> int:
    """Fill ``out_slots``/``out_scores`` with the best ``k`` workers; returns how many.

    ``out_cached``/``out_tier``: the step's tokens cached on each of them and
    their tier (0 none, 1 GPU, 2 host, 3 / 4 loaded from the home's GPU / host),
    as scored.
    """
    count = 0
    domain = kv_domain[home] if home >= 0 else -1
    for w in range(n_workers):
        if not allowed[w]:
            continue
        rate = prefill_tokens_per_s[w]
        bs = block_size_tokens[w]
        cached = 0
        tier_w = 0
        if w == home and home_tier != 0:
            cached = min(cached_tokens, step_tokens)
            tier_w = home_tier
        pre = prefix_blocks[w] * bs
        if pre > step_tokens:
            pre = step_tokens
        if pre > 0 and (pre > cached or (tier_w == TIER_HOST and pre == cached)):
            cached = pre
            tier_w = TIER_GPU
        if w != home and domain >= 0 and kv_domain[w] == domain and home_tier != 0:
            pulled = min(cached_tokens, step_tokens)
            if pulled > cached:
                full = prefill_s(float(step_tokens), rate, knee_tokens)
                copy_s = pulled * bytes_per_token[w] / host_link_bytes_per_s[w]
                if home_tier == TIER_GPU:
                    copy_s += pulled * bytes_per_token[home] / host_link_bytes_per_s[home]
                load_gain = (
                    full - prefill_s(float(step_tokens - pulled), rate, knee_tokens) - copy_s
                )
                local_gain = full - prefill_s(float(step_tokens - cached), rate, knee_tokens)
                if load_gain > local_gain:
                    cached = pulled
                    tier_w = TIER_PEER_GPU if home_tier == TIER_GPU else TIER_PEER_HOST
        saved = 0.0
        if cached > 0:
            saved = (1.0 + rebuild_weight) * (
                prefill_s(float(step_tokens), rate, knee_tokens)
                - prefill_s(float(step_tokens - cached), rate, knee_tokens)
            )
            if tier_w >= TIER_HOST:
                saved -= cached * bytes_per_token[w] / host_link_bytes_per_s[w]
            if tier_w == TIER_PEER_GPU:
                saved -= cached * bytes_per_token[home] / host_link_bytes_per_s[home]
            if w == home:
                saved += affinity_bonus_s
        queue_s = (queued_prefill_tokens[w] + placed_tokens[w]) / rate
        on_gpu = cached if tier_w == TIER_GPU else 0
        need_blocks = (step_tokens - on_gpu + bs - 1) // bs
        free_blocks = gpu_cap_blocks[w] - gpu_used_blocks[w]
        deficit = need_blocks - free_blocks
        evict_s = 0.0
        if deficit > 0:
            evict_s = evict_cost_factor * prefill_s(float(deficit * bs), rate, knee_tokens)
        slack = free_blocks - need_blocks
        if slack < 0:
            slack = 0
        cap = gpu_cap_blocks[w]
        if cap < 1:
            cap = 1
        score = saved - queue_s - evict_s - bestfit_weight_s * (slack / cap)
        # insertion into the sorted top-k (score desc; earlier slot wins ties)
        if count < k:
            pos = count
            count += 1
        elif score > out_scores[count - 1]:
            pos = count - 1
        else:
            continue
        while pos > 0 and out_scores[pos - 1] < score:
            out_scores[pos] = out_scores[pos - 1]
            out_slots[pos] = out_slots[pos - 1]
            out_cached[pos] = out_cached[pos - 1]
            out_tier[pos] = out_tier[pos - 1]
            pos -= 1
        out_scores[pos] = score
        out_slots[pos] = w
        out_cached[pos] = cached
        out_tier[pos] = tier_w
    return count
