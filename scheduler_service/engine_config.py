"""The engine's knobs in one place; costs are in GPU seconds."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler_service.costs import DEFAULT_ATTENTION_KNEE_TOKENS
from scheduler_service.graph import GraphPrior

#: How fast a worker's decode-time floor forgets (per observed step): a floor
#: set by one lucky step rises back ~0.2% a step until steps confirm it.
DECODE_FLOOR_DRIFT = 0.002


@dataclass(slots=True)
class EngineConfig:
    """Engine knobs (defaults suit a vLLM-like fleet); costs are GPU seconds."""

    affinity_ttl_s: float = 30.0
    max_candidates: int = 16
    # NOTE: retained sessions are leased, never pinned. This TTL applies when
    # the engine knows nothing about a session's size (it cannot price it).
    default_lease_ttl_s: float = 10.0
    min_lease_ttl_s: float = 1.0
    max_lease_ttl_s: float = 300.0
    knee_tokens: float = DEFAULT_ATTENTION_KNEE_TOKENS
    # a session with no event for this long (and no step running) is dropped
    # and its KV released; 0 keeps sessions until they finish
    session_idle_ttl_s: float = 3600.0
    # retention prices
    idle_utilization: float = 0.5  # holding KV is free below this pool utilisation
    max_shadow_price: float = 1.0  # GPU-s per s of holding a whole full pool
    demand_weight: float = 0.5
    demand_horizon_s: float = 5.0
    transfer_weight: float = 0.25  # GPU-s per s of host-link transfer (mostly overlapped)
    prefetch_margin: float = 0.25  # start a reload this much of its duration early
    redecide_price_ratio: float = 1.5
    # pressure: below low watermark free, evict up to the high one
    low_watermark: float = 0.05
    high_watermark: float = 0.10
    # placement
    evict_cost_factor: float = 1.0
    bestfit_weight_s: float = 0.01
    affinity_bonus_s: float = 0.05
    # NOTE: a step moved off its home rebuilds its context on the thief: that
    # prefill is GPU time the whole fleet loses, not only this step's wait, so
    # the home's saving counts (1 + this) times against the queues it avoids.
    rebuild_weight: float = 0.0
    # prompt blocks the prefix index remembers (least recently stored go first)
    prefix_index_blocks: int = 1 << 20
    graph_prior: GraphPrior = field(default_factory=GraphPrior)
    use_reference_kernels: bool = False  # plain-Python twins (tests, benchmark)
    # apply batches and timers with the compiled event kernels (engine_batch);
    # off, every event takes the per-event Python path (their reference twin)
    batch_path: bool = True
