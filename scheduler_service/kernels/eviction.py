"""Kernel: which resident idle sessions of one worker to evict, in order.

Cost-aware farthest-next-use: a session is a good victim when its next use is
far (predicted time to next use, stretched by 1 / P(it continues at all)), it
is big (blocks freed) and it is cheap to rebuild. The key is

    time_to_next_use / max(P(continue), 0.01) × blocks / rebuild_s / protection

and victims are taken from the highest key until ``need_blocks`` are freed.
Only sessions on the GPU tier that are not running a step are candidates.
Ties go to the lower slot so the order never depends on list order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scheduler_service.kernels.costs import prefill_s

TIER_GPU = 1
STATE_RUNNING = 1
MIN_TIME_TO_NEXT_USE_S = 1e-3
MIN_P_CONTINUE = 0.01
MIN_REBUILD_S = 1e-6


@njit(cache=True)
def victim_key(
    next_use_s: float,
    now: float,
    p_continue: float,
    blocks: int,
    context_tokens: int,
    prefill_tokens_per_s: float,
    knee_tokens: float,
    protection: float,
) -> float:
    """Eviction priority of one session (higher: evict sooner)."""
    ttn = next_use_s - now
    if ttn < MIN_TIME_TO_NEXT_USE_S:
        ttn = MIN_TIME_TO_NEXT_USE_S
    pc = p_continue
    if pc < MIN_P_CONTINUE:
        pc = MIN_P_CONTINUE
    rebuild = prefill_s(float(context_tokens), prefill_tokens_per_s, knee_tokens)
    if rebuild < MIN_REBUILD_S:
        rebuild = MIN_REBUILD_S
    return ttn / pc * blocks / rebuild / protection


@njit(cache=True)
def victim_keys(
    cand: np.ndarray,
    next_use_s: np.ndarray,
    p_continue: np.ndarray,
    gpu_blocks: np.ndarray,
    context_tokens: np.ndarray,
    home: np.ndarray,
    worker_prefill_tokens_per_s: np.ndarray,
    now: float,
    knee_tokens: float,
    out: np.ndarray,
) -> None:
    """``victim_key`` (protection 1) of sessions ``cand`` on their homes, into ``out``.

    For ranking across workers (a tenant over its quota): each session is
    priced at its own home's prefill rate.
    """
    for i in range(cand.shape[0]):
        c = cand[i]
        out[i] = victim_key(
            next_use_s[c],
            now,
            p_continue[c],
            gpu_blocks[c],
            context_tokens[c],
            worker_prefill_tokens_per_s[home[c]],
            knee_tokens,
            1.0,
        )


@njit(cache=True)
def rank_victims(
    head: int,
    next_slot: np.ndarray,
    tier: np.ndarray,
    state: np.ndarray,
    gpu_blocks: np.ndarray,
    context_tokens: np.ndarray,
    next_use_s: np.ndarray,
    p_continue: np.ndarray,
    tenant: np.ndarray,
    tenant_protection: np.ndarray,
    now: float,
    prefill_tokens_per_s: float,
    knee_tokens: float,
    need_blocks: int,
    exclude: int,
) -> np.ndarray:
    """Victim slots, best first, whose blocks add up to ``need_blocks`` (or all there are)."""
    n = 0
    s = head
    while s != -1:
        n += 1
        s = next_slot[s]
    cand = np.empty(n, dtype=np.int64)
    m = 0
    s = head
    while s != -1:
        if tier[s] == TIER_GPU and state[s] != STATE_RUNNING and gpu_blocks[s] > 0 and s != exclude:
            cand[m] = s
            m += 1
        s = next_slot[s]
    if need_blocks <= 0 or m == 0:
        return np.empty(0, dtype=np.int64)
    cand = np.sort(cand[:m])
    neg_keys = np.empty(m, dtype=np.float64)
    for i in range(m):
        c = cand[i]
        t = tenant[c]
        prot = tenant_protection[t] if t >= 0 else 1.0
        neg_keys[i] = -victim_key(
            next_use_s[c],
            now,
            p_continue[c],
            gpu_blocks[c],
            context_tokens[c],
            prefill_tokens_per_s,
            knee_tokens,
            prot,
        )
    order = np.argsort(neg_keys, kind="mergesort")
    out = np.empty(m, dtype=np.int64)
    freed = 0
    k = 0
    for i in range(m):
        c = cand[order[i]]
        out[k] = c
        k += 1
        freed += gpu_blocks[c]
        if freed >= need_blocks:
            break
    return out[:k]
