"""Plain-Python twins of the numba kernels: the readable definition of each.

Tests check that every kernel agrees with its twin on random inputs, and the
benchmark runs the engine on these twins to show what the compilation buys.
Each twin follows its kernel's arithmetic operation for operation, so the two
agree exactly, not just approximately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from scheduler_service.kernels.eviction import (
    MIN_P_CONTINUE,
    MIN_REBUILD_S,
    MIN_TIME_TO_NEXT_USE_S,
    STATE_RUNNING,
    TIER_GPU,
)
from scheduler_service.kernels.placement import TIER_HOST as _TIER_HOST
from scheduler_service.kernels.placement import TIER_PEER_GPU as _TIER_PEER_GPU
from scheduler_service.kernels.placement import TIER_PEER_HOST as _TIER_PEER_HOST
from scheduler_service.kernels.pressure import NO_SLOT as _NO_SLOT
from scheduler_service.kernels.pressure import PREFETCHED as _PREFETCHED
from scheduler_service.kernels.pressure import PRICE_EPSILON as _PRICE_EPSILON
from scheduler_service.kernels.pressure import STATE_TOOL_WAIT as _STATE_TOOL_WAIT
from scheduler_service.kernels.pressure import TIER_GPU as _TIER_GPU
from scheduler_service.kernels.retention import OFFLOAD_HOST, RELEASE, RETAIN_GPU

_INF = 1e300


def prefill_s(tokens: float, prefill_tokens_per_s: float, knee_tokens: float) -> float:
    """Prefill seconds: the linear term plus the quadratic attention term."""
    linear = tokens / prefill_tokens_per_s
    return linear + linear * (tokens / knee_tokens)


def remaining_time(
    hist: Sequence[float],
    upper_edges: Sequence[float],
    mids: Sequence[float],
    waited_s: float,
    quantile: float,
) -> tuple[float, float, float]:
    """(mean remaining s, quantile remaining s, surviving mass) given ``waited_s``."""
    live = []  # (mass, representative, lower, upper, mid) of buckets the wait allows
    for b, (h, u, m) in enumerate(zip(hist, upper_edges, mids, strict=True)):
        if u <= waited_s or h <= 0.0:
            continue
        lower = max(float(upper_edges[b - 1]) if b > 0 else 0.0, waited_s)
        v = 0.5 * (waited_s + float(u)) if m < waited_s else float(m)
        live.append((float(h), v, lower, float(u), float(m)))
    mass = 0.0
    acc = 0.0
    for h, v, _lo, _up, _mid in live:
        mass += h
        acc += h * (v - waited_s)
    if mass <= 0.0:
        return waited_s, waited_s, 0.0
    target = quantile * mass
    cum = 0.0
    q_value = 0.0
    for h, _v, lower, upper, mid in live:
        if cum + h >= target:
            if upper == math.inf:
                q_value = max(mid, lower) - waited_s
            else:
                q_value = lower + (upper - lower) * ((target - cum) / h) - waited_s
            break
        cum += h
    return acc / mass, q_value, mass


def place_topk(
    allowed: npt.NDArray[np.bool_],
    gpu_cap_blocks: npt.NDArray[np.int64],
    gpu_used_blocks: npt.NDArray[np.int64],
    queued_prefill_tokens: npt.NDArray[np.int64],
    placed_tokens: npt.NDArray[np.int64],
    prefix_blocks: npt.NDArray[np.int64],
    prefill_tokens_per_s: npt.NDArray[np.float64],
    block_size_tokens: npt.NDArray[np.int64],
    bytes_per_token: npt.NDArray[np.int64],
    host_link_bytes_per_s: npt.NDArray[np.float64],
    kv_domain: npt.NDArray[np.int64],
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
    out_slots: npt.NDArray[np.int32],
    out_scores: npt.NDArray[np.float64],
    out_cached: npt.NDArray[np.int64],
    out_tier: npt.NDArray[np.int64],
) -> int:
    """Score all allowed workers, stable-sort by (−score, slot), keep k."""
    scored: list[tuple[float, int, int, int]] = []
    for w in range(n_workers):
        if not allowed[w]:
            continue
        rate = float(prefill_tokens_per_s[w])
        bs = int(block_size_tokens[w])
        on_home = w == home and home_tier != 0
        cached = min(cached_tokens, step_tokens) if on_home else 0
        tier_w = home_tier if on_home else 0
        pre = min(int(prefix_blocks[w]) * bs, step_tokens)
        if pre > 0 and (pre > cached or (tier_w == _TIER_HOST and pre == cached)):
            cached, tier_w = pre, TIER_GPU
        shares_kv = home >= 0 and w != home and int(kv_domain[w]) == int(kv_domain[home]) >= 0
        pulled = min(cached_tokens, step_tokens)
        if shares_kv and home_tier != 0 and pulled > cached:
            # loading the home's KV (out of its GPU first if it is there) vs the local prefix
            copy_s = pulled * int(bytes_per_token[w]) / float(host_link_bytes_per_s[w])
            if home_tier == TIER_GPU:
                copy_s += pulled * int(bytes_per_token[home]) / float(host_link_bytes_per_s[home])
            full = prefill_s(float(step_tokens), rate, knee_tokens)
            load_gain = full - prefill_s(float(step_tokens - pulled), rate, knee_tokens) - copy_s
            if load_gain > full - prefill_s(float(step_tokens - cached), rate, knee_tokens):
                cached = pulled
                tier_w = _TIER_PEER_GPU if home_tier == TIER_GPU else _TIER_PEER_HOST
        saved = 0.0
        if cached > 0:
            saved = (1.0 + rebuild_weight) * (
                prefill_s(float(step_tokens), rate, knee_tokens)
                - prefill_s(float(step_tokens - cached), rate, knee_tokens)
            )
            if tier_w in (_TIER_HOST, _TIER_PEER_GPU, _TIER_PEER_HOST):
                # the copy in over this worker's link
                saved -= cached * int(bytes_per_token[w]) / float(host_link_bytes_per_s[w])
            if tier_w == _TIER_PEER_GPU:
                # and first the copy out of the home's GPU over its link
                saved -= cached * int(bytes_per_token[home]) / float(host_link_bytes_per_s[home])
            if w == home:
                saved += affinity_bonus_s
        queue_s = (int(queued_prefill_tokens[w]) + int(placed_tokens[w])) / rate
        on_gpu = cached if tier_w == TIER_GPU else 0
        need_blocks = -(-(step_tokens - on_gpu) // bs)
        free_blocks = int(gpu_cap_blocks[w]) - int(gpu_used_blocks[w])
        deficit = need_blocks - free_blocks
        evict_s = (
            evict_cost_factor * prefill_s(float(deficit * bs), rate, knee_tokens)
            if deficit > 0
            else 0.0
        )
        slack = max(free_blocks - need_blocks, 0)
        cap = max(int(gpu_cap_blocks[w]), 1)
        score = saved - queue_s - evict_s - bestfit_weight_s * (slack / cap)
        scored.append((score, w, cached, tier_w))
    scored.sort(key=lambda t: (-t[0], t[1]))
    top = scored[:k]
    for i, (score, w, cached, tier_w) in enumerate(top):
        out_slots[i] = w
        out_scores[i] = score
        out_cached[i] = cached
        out_tier[i] = tier_w
    return len(top)


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
    ttn = max(next_use_s - now, MIN_TIME_TO_NEXT_USE_S)
    pc = max(p_continue, MIN_P_CONTINUE)
    rebuild = max(
        prefill_s(float(context_tokens), prefill_tokens_per_s, knee_tokens), MIN_REBUILD_S
    )
    return ttn / pc * blocks / rebuild / protection


def victim_keys(
    cand: npt.NDArray[np.intp],
    next_use_s: npt.NDArray[np.float64],
    p_continue: npt.NDArray[np.float64],
    gpu_blocks: npt.NDArray[np.int64],
    context_tokens: npt.NDArray[np.int64],
    home: npt.NDArray[np.int32],
    worker_prefill_tokens_per_s: npt.NDArray[np.float64],
    now: float,
    knee_tokens: float,
    out: npt.NDArray[np.float64],
) -> None:
    """``victim_key`` (protection 1) of sessions ``cand`` on their homes, into ``out``."""
    for i, c in enumerate(cand.tolist()):
        out[i] = victim_key(
            float(next_use_s[c]),
            now,
            float(p_continue[c]),
            int(gpu_blocks[c]),
            int(context_tokens[c]),
            float(worker_prefill_tokens_per_s[home[c]]),
            knee_tokens,
            1.0,
        )


def rank_victims(
    head: int,
    next_slot: npt.NDArray[np.int32],
    tier: npt.NDArray[np.int8],
    state: npt.NDArray[np.int8],
    gpu_blocks: npt.NDArray[np.int64],
    context_tokens: npt.NDArray[np.int64],
    next_use_s: npt.NDArray[np.float64],
    p_continue: npt.NDArray[np.float64],
    tenant: npt.NDArray[np.int32],
    tenant_protection: npt.NDArray[np.float64],
    now: float,
    prefill_tokens_per_s: float,
    knee_tokens: float,
    need_blocks: int,
    exclude: int,
) -> npt.NDArray[np.int64]:
    """Victim slots, best first, whose blocks add up to ``need_blocks`` (or all there are)."""
    members: list[int] = []
    s = head
    while s != -1:
        members.append(s)
        s = int(next_slot[s])
    cands = [
        c
        for c in members
        if tier[c] == TIER_GPU and state[c] != STATE_RUNNING and gpu_blocks[c] > 0 and c != exclude
    ]
    if need_blocks <= 0 or not cands:
        return np.empty(0, dtype=np.int64)

    def key(c: int) -> tuple[float, int]:
        t = int(tenant[c])
        prot = float(tenant_protection[t]) if t >= 0 else 1.0
        k = victim_key(
            float(next_use_s[c]),
            now,
            float(p_continue[c]),
            int(gpu_blocks[c]),
            int(context_tokens[c]),
            prefill_tokens_per_s,
            knee_tokens,
            prot,
        )
        return (-k, c)

    out: list[int] = []
    freed = 0
    for c in sorted(cands, key=key):
        out.append(c)
        freed += int(gpu_blocks[c])
        if freed >= need_blocks:
            break
    return np.array(out, dtype=np.int64)


def retention_choice(
    blocks: int,
    capacity_blocks: int,
    shadow_price: float,
    expected_remaining_s: float,
    p_continue: float,
    rebuild_s: float,
    offload_s: float,
    reload_s: float,
    host_ok: bool,
    transfer_weight: float,
    min_ttl_s: float,
    max_ttl_s: float,
) -> tuple[int, float, float, float, float]:
    """(action, lease TTL s, cost retain, cost offload, cost release)."""
    hold_rate = shadow_price * blocks / max(capacity_blocks, 1)
    c_retain = hold_rate * expected_remaining_s
    c_offload = _INF
    if host_ok:
        stall = max(reload_s - expected_remaining_s, 0.0)
        c_offload = (
            hold_rate * offload_s
            + transfer_weight * (offload_s + p_continue * reload_s)
            + p_continue * stall
        )
    c_release = p_continue * rebuild_s
    alt = min(c_offload, c_release)
    if c_retain <= alt:
        ttl = alt / hold_rate if hold_rate > 0.0 else max_ttl_s
        return RETAIN_GPU, max(min(ttl, max_ttl_s), min_ttl_s), c_retain, c_offload, c_release
    if c_offload <= c_release:
        return OFFLOAD_HOST, 0.0, c_retain, c_offload, c_release
    return RELEASE, 0.0, c_retain, c_offload, c_release


def pricier_workers(
    cap: npt.NDArray[np.int64],
    used: npt.NDArray[np.int64],
    queued_tokens: npt.NDArray[np.int64],
    prefill_tokens_per_s: npt.NDArray[np.float64],
    residents: npt.NDArray[np.int32],
    connected: npt.NDArray[np.bool_],
    before: npt.NDArray[np.float64],
    idle_utilization: float,
    max_price: float,
    demand_weight: float,
    demand_horizon_s: float,
    ratio: float,
    out: npt.NDArray[np.int64],
) -> int:
    """Twin of ``pressure.pricier_workers``, vectorised as the engine once ran it."""
    n = before.shape[0]
    c = cap[:n]
    over = np.clip(
        (used[:n] / np.maximum(c, 1) - idle_utilization) / (1.0 - idle_utilization), 0.0, 1.0
    )
    demand_s = queued_tokens[:n] / prefill_tokens_per_s[:n]
    price = np.where(
        c > 0,
        max_price * (over * over) + demand_weight * demand_s / (demand_s + demand_horizon_s),
        max_price,
    )
    rose = (price > before * ratio + _PRICE_EPSILON) & (residents[:n] > 0) & connected[:n]
    np.minimum(before, price, out=before)
    found = np.flatnonzero(rose)
    out[: found.size] = found
    return int(found.size)


def leases_priced_below(
    head: int,
    next_slot: npt.NDArray[np.int32],
    price_at_grant: npt.NDArray[np.float64],
    state: npt.NDArray[np.int8],
    tier: npt.NDArray[np.int8],
    node: npt.NDArray[np.int32],
    prefetch_at_s: npt.NDArray[np.float64],
    floor: float,
    out: npt.NDArray[np.int64],
) -> int:
    """Twin of ``pressure.leases_priced_below``."""
    k = 0
    s = int(head)
    while s != _NO_SLOT:
        if (
            price_at_grant[s] < floor
            and state[s] == _STATE_TOOL_WAIT
            and tier[s] == _TIER_GPU
            and node[s] != _NO_SLOT
            and prefetch_at_s[s] != _PREFETCHED
        ):
            out[k] = s
            k += 1
        s = int(next_slot[s])
    return k


def live_work(
    tenant: npt.NDArray[np.int32],
    started_s: npt.NDArray[np.float64],
    ideal_s: npt.NDArray[np.float64],
    now: float,
    elapsed_out: npt.NDArray[np.float64],
    ideal_out: npt.NDArray[np.float64],
) -> None:
    """Twin of ``pressure.live_work``, as the engine once ran it in numpy."""
    n = elapsed_out.shape[0]
    live = (tenant >= 0) & (tenant < n)
    t = tenant[live]
    elapsed_out[:] = np.bincount(t, weights=now - started_s[live], minlength=n)[:n]
    ideal_out[:] = np.bincount(t, weights=ideal_s[live], minlength=n)[:n]


def columns_valid(
    slots: npt.NDArray[np.int64],
    context_tokens: npt.NDArray[np.int64],
    new_tokens: npt.NDArray[np.int64],
    step_index: npt.NDArray[np.int64],
    hints_s: npt.NDArray[np.float64],
    tenants: npt.NDArray[np.int64],
    plain: npt.NDArray[np.bool_],
    tenant_of_slot: npt.NDArray[np.int32],
) -> bool:
    """Twin of ``checks.columns_valid``."""
    for i in range(len(slots)):
        if context_tokens[i] < 0 or new_tokens[i] < 0 or step_index[i] < 0:
            return False
        if not 0.0 <= hints_s[i] < math.inf:
            return False
        if plain[i] and tenant_of_slot[slots[i]] != tenants[i]:
            return False
    return True
