"""Kernel: retain, offload or release a session's KV while it waits on a tool.

All costs are GPU seconds. With h = shadow price × blocks / capacity (the
GPU-seconds per second that holding the blocks costs):

* retain:  h × E[remaining tool time]
* offload: h × offload time (blocks still held while copying out)
           + transfer weight × (offload + P(continue) × reload)  (link time)
           + P(continue) × max(0, reload − E[remaining])          (exposed stall)
* release: P(continue) × full recompute

A retain carries the ski-rental TTL: the time after which holding has cost as
much as the cheaper alternative (2-competitive without a prediction). Ties go
to retain, then offload.
"""

from __future__ import annotations

from numba import njit

RETAIN_GPU = 1
OFFLOAD_HOST = 2
RELEASE = 4
_INF = 1e300


@njit(cache=True, inline="always")
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
    cap = capacity_blocks
    if cap < 1:
        cap = 1
    hold_rate = shadow_price * blocks / cap
    c_retain = hold_rate * expected_remaining_s
    c_offload = _INF
    if host_ok:
        stall = reload_s - expected_remaining_s
        if stall < 0.0:
            stall = 0.0
        c_offload = (
            hold_rate * offload_s
            + transfer_weight * (offload_s + p_continue * reload_s)
            + p_continue * stall
        )
    c_release = p_continue * rebuild_s
    alt = c_offload if c_offload < c_release else c_release
    if c_retain <= alt:
        ttl = max_ttl_s
        if hold_rate > 0.0:
            ttl = alt / hold_rate
        if ttl > max_ttl_s:
            ttl = max_ttl_s
        if ttl < min_ttl_s:
            ttl = min_ttl_s
        return RETAIN_GPU, ttl, c_retain, c_offload, c_release
    if c_offload <= c_release:
        return OFFLOAD_HOST, 0.0, c_retain, c_offload, c_release
    return RELEASE, 0.0, c_retain, c_offload, c_release
