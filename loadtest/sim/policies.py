"""Baseline policies behind one small protocol (policy is data, the simulator is mechanism).

* ``rr-lru``: round-robin placement; blocks freed at step end stay cached and
  are evicted LRU (request-level serving with prefix caching on).
* ``vllm-apc``: vLLM automatic prefix caching (finished steps' blocks stay
  until pressure, LRU, tail-first) with session-affinity routing (a session
  hashes to one replica, as the vLLM production-stack session router does).
* ``llmd-prefix``: llm-d-style scoring: precise prefix-cache hits plus queue
  and KV-utilisation scorers, vLLM APC eviction on the replica.
* ``ttl-pin``: Continuum-style: at a tool call the session's blocks are pinned
  for a TTL derived from the tool's observed latency, on top of ``vllm-apc``.
* ``oracle``: ``vllm-apc`` placement with clairvoyant eviction (the session
  whose next step is farthest in the future goes first, tail first).
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

from loadtest.sim.cluster import Pool


class Policy(Protocol):
    """What the simulator asks a policy; every method gets virtual time ``now``."""

    name: str
    tick_s: float  # 0: no periodic callback

    def attach(self, sim: object) -> None: ...
    def place(self, sid: int, step: int, now: float) -> int: ...
    def step_priority(self, sid: int) -> int: ...
    def kv_source(self, sid: int) -> int: ...
    def evict(self, pool: Pool, need_blocks: int, now: float, exclude: int) -> None: ...
    def on_admit(self, sid: int, step: int, r: int, now: float) -> None: ...
    def on_step_end(self, sid: int, step: int, r: int, now: float) -> None: ...
    def on_tool_end(self, sid: int, step: int, now: float) -> None: ...
    def on_finish(self, sid: int, r: int, now: float) -> None: ...
    def on_tick(self, now: float) -> None: ...


class VllmApc:
    """Session-affinity routing + vLLM APC (LRU, tail-first) eviction."""

    name = "vllm-apc"
    tick_s = 0.0

    def attach(self, sim: object) -> None:
        """Bind to the simulator."""
        self.sim = sim
        self.n = sim.cluster.replicas  # type: ignore[attr-defined]
        self.sessions = sim.sessions  # type: ignore[attr-defined]

    def home(self, sid: int) -> int:
        """The replica a session hashes to (stable across runs: crc32, not hash())."""
        s = self.sessions[sid]
        key = self.sessions[s.parent].session_id if s.parent >= 0 else s.session_id
        # NOTE: multi-agent workers hash with their planner so they find its prefix
        return int(zlib.crc32(key.encode()) % self.n)

    def place(self, sid: int, step: int, now: float) -> int:
        """Affinity: always the session's hash home."""
        return self.home(sid)

    def step_priority(self, sid: int) -> int:
        """Every step the same: the replica's queue is first come, first served."""
        return 0

    def kv_source(self, sid: int) -> int:
        """The replica the placed step loads its KV from (-1: none; it never moves KV)."""
        return -1

    def evict(self, pool: Pool, need_blocks: int, now: float, exclude: int = -1) -> None:
        """LRU session first, its tail blocks first (never ``exclude``, being admitted)."""
        pool.evict_lru(need_blocks, exclude)

    def on_admit(self, sid: int, step: int, r: int, now: float) -> None:
        """Nothing to do."""

    def on_step_end(self, sid: int, step: int, r: int, now: float) -> None:
        """Blocks stay cached (the simulator already queued them LRU)."""

    def on_tool_end(self, sid: int, step: int, now: float) -> None:
        """Nothing to do."""

    def on_finish(self, sid: int, r: int, now: float) -> None:
        """Nothing: APC keeps a finished request's blocks until pressure."""

    def on_tick(self, now: float) -> None:
        """No periodic work."""


class RoundRobinLru(VllmApc):
    """Round-robin placement (no affinity), APC LRU eviction."""

    name = "rr-lru"

    def attach(self, sim: object) -> None:
        """Bind and reset the rotor."""
        super().attach(sim)
        self.next = 0

    def place(self, sid: int, step: int, now: float) -> int:
        """The next replica in turn."""
        r = self.next
        self.next = (r + 1) % self.n
        return r


class LlmdPrefix(VllmApc):
    """llm-d-style weighted scorers: prefix-cache hit, queue depth, KV utilisation."""

    name = "llmd-prefix"
    # llm-d's default inference-scheduler profile weighs the prefix scorer over load
    prefix_weight = 3.0
    queue_weight = 2.0
    kv_weight = 1.0

    def place(self, sid: int, step: int, now: float) -> int:
        """Best weighted score; ties go to the hash home."""
        sim = self.sim
        s = self.sessions[sid]
        prompt = max(1, s.context_before_step(step))
        bs = sim.model.block_size_tokens  # type: ignore[attr-defined]
        reps = sim.replicas  # type: ignore[attr-defined]
        queued = [sim.queued_prefill_tokens(i) for i in range(len(reps))]  # type: ignore[attr-defined]
        qmax = max(queued) or 1
        home = self.home(sid)
        best, best_score = home, -math.inf
        for i, rep in enumerate(reps):
            pool = rep.pool
            cached = pool.gpu.get(sid, 0) * bs
            if cached == 0 and s.parent >= 0 and step == 0:
                cached = min(pool.gpu.get(s.parent, 0) * bs, s.shared_prefix_tokens)
            score = (
                self.prefix_weight * min(1.0, cached / prompt)
                - self.queue_weight * queued[i] / qmax
                - self.kv_weight * pool.used / pool.cap
                + (1e-6 if i == home else 0.0)
            )
            if score > best_score:
                best, best_score = i, score
        return best


class TtlPin(VllmApc):
    """Continuum-style tool-call TTL pinning on top of vLLM APC."""

    name = "ttl-pin"
    min_ttl_s = 0.5
    max_ttl_s = 30.0
    quantile_margin = 1.5  # TTL = margin × the tool's running mean latency

    def attach(self, sim: object) -> None:
        """Bind; per-tool latency means start empty and learn online."""
        super().attach(sim)
        self.mean_s: dict[str, tuple[float, int]] = {}
        self.wait_from: dict[int, tuple[str, float]] = {}

    def ttl_s(self, tool: str) -> float:
        """How long to pin for ``tool`` (a default before it was ever seen)."""
        m = self.mean_s.get(tool)
        ttl = 5.0 if m is None else self.quantile_margin * m[0]
        return min(self.max_ttl_s, max(self.min_ttl_s, ttl))

    def on_step_end(self, sid: int, step: int, r: int, now: float) -> None:
        """Pin the session's blocks through its tool call, until the TTL."""
        tool = self.sessions[sid].tool_names[step]
        self.wait_from[sid] = (tool, now)
        self.sim.lease(r, sid, self.ttl_s(tool))  # type: ignore[attr-defined]

    def on_tool_end(self, sid: int, step: int, now: float) -> None:
        """Learn the tool's latency."""
        tool, t0 = self.wait_from.pop(sid, ("", now))
        mean, n = self.mean_s.get(tool, (0.0, 0))
        self.mean_s[tool] = (mean + (now - t0 - mean) / (n + 1), n + 1)


class Clairvoyant(VllmApc):
    """vLLM-apc placement with Bélády eviction using the future trace."""

    name = "oracle"

    def evict(self, pool: Pool, need_blocks: int, now: float, exclude: int = -1) -> None:
        """Farthest next use first (finished sessions are never used again), tail first."""
        nxt = self.sim.next_use_s  # type: ignore[attr-defined]
        while pool.free < need_blocks:
            victims = [s for s in pool.lru if s != exclude]
            if not victims:
                return
            v = max(victims, key=lambda s: (s in pool.dead, nxt[s]))
            pool.take(v, min(pool.gpu[v], need_blocks - pool.free))


BASELINES = {p.name: p for p in (RoundRobinLru, VllmApc, LlmdPrefix, TtlPin, Clairvoyant)}
