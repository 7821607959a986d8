"""The discrete-event cluster simulator (mechanism; policies decide).

A step's life: it becomes ready (arrival or tool return), the policy places it
on a replica, it queues there until the pool can hold its context and output
(FIFO, at most ``max_running_steps`` running), then its uncached tokens are
prefilled on the replica's prefill lane (tokens cached on the host tier are
reloaded over the link instead), then it decodes at a per-token time set by
the batch's KV reads, then the agent waits on its tool. Each replica's prefill
lane is serial: prefill is compute bound, so steps sharing a replica queue for
it; decode is memory bound and batches.

The admission queue and the prefill lane are ordered by the step priority
the policy gives (higher first, then arrival), as vLLM's
``--scheduling-policy priority`` orders its queues; the baselines give every step the same priority,
which is first come, first served.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.sim.cluster import ClusterConfig, Pool, ReplicaModel
from loadtest.sim.metrics import Recorder
from loadtest.sim.policies import Policy
from loadtest.workloads import CLOSED_LOOP, AgentSession

ARRIVE, READY, PREFILL_DONE, DECODE_DONE, TOOL_END, LEASE_END, TICK, SAMPLE, LANE_WAKE = range(9)


@dataclass(slots=True)
class Replica:
    """One model replica: pool, admission queue, prefill lane, decode batch."""

    pool: Pool
    queue: list[tuple[int, int, int]] = field(default_factory=list)  # heap (-priority, seq, sid)
    lane: list[tuple[int, int, int]] = field(default_factory=list)  # heap (-priority, seq, sid)
    lane_free_s: float = 0.0  # when the prefill in progress ends
    lane_pending_s: float = 0.0  # prefill seconds admitted but not started
    index: int = 0
    wake_s: float = -1.0  # a LANE_WAKE is due then (a step's KV copy lands)
    running: int = 0
    running_kv_tokens: int = 0
    queued_prefill_tokens: int = 0


class Simulator:
    """Runs one policy over one workload on one cluster, in virtual time."""

    def __init__(
        self,
        sessions: list[AgentSession],
        cluster: ClusterConfig,
        policy: Policy,
        duration_s: float,
        slo_ttft_s: float = 2.0,
        sample_s: float = 1.0,
        record_trace: bool = True,
        closed_loop: dict[str, int] | None = None,
        trace_events: bool = False,
    ) -> None:
        self.sessions = sessions
        self.index = {s.session_id: i for i, s in enumerate(sessions)}
        self.cluster = cluster
        self.model = ReplicaModel.of(cluster)
        m = self.model
        self.replicas = [
            Replica(Pool(m.capacity_blocks, m.host_capacity_blocks), index=i)
            for i in range(cluster.replicas)
        ]
        self.policy = policy
        self.duration_s = duration_s
        self.sample_s = sample_s
        n = len(sessions)
        self.step = [0] * n
        self.where = [-1] * n  # replica of the current (or last) step
        self.ready_s = [0.0] * n
        self.computed_tokens = [0] * n  # most context ever computed for the session
        self.next_use_s = [math.inf] * n  # clairvoyant: when the session's next step is ready
        self.pending_children = [0] * n
        self.queued_est = [0] * n  # prefill tokens a queued step was counted for
        self.priority = [0] * n  # the current step's priority
        self.lane_ready_s = [0.0] * n  # an admitted step's KV is reloaded by then
        self.lane_prefill_s = [0.0] * n  # an admitted step's prefill time
        # closed loop: per tenant, the backlog of tasks not started yet (in draw order)
        # the agent trace (loadtest.sim.replay documents the format), when asked for
        self.events: list[dict[str, Any]] | None = [] if trace_events else None
        self.closed_loop = dict(closed_loop or {})
        self.backlog: dict[str, deque[int]] = {t: deque() for t in self.closed_loop}
        for i, s in enumerate(sessions):
            if s.arrival_s == CLOSED_LOOP and s.parent < 0 and s.tenant_id in self.backlog:
                self.backlog[s.tenant_id].append(i)
        self.rec = Recorder(sessions, self.model, cluster.replicas, slo_ttft_s, record_trace)
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self.now = 0.0
        self.steps_done = 0

    # -- events ------------------------------------------------------------------

    def at(self, t: float, kind: int, a: int) -> None:
        """Schedule event ``kind`` with argument ``a`` at time ``t``."""
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a))

    def run(self, progress: Callable[[float], None] | None = None) -> Recorder:
        """Simulate until ``duration_s``; returns the metrics recorder."""
        for i, s in enumerate(self.sessions):
            if s.arrival_s >= 0.0:
                self.at(s.arrival_s, ARRIVE, i)
        for tenant, n in self.closed_loop.items():
            # NOTE: the first tasks start spread over 30 s so they do not step in lockstep
            for k in range(min(n, len(self.backlog[tenant]))):
                self.at(30.0 * k / n, ARRIVE, self.backlog[tenant].popleft())
        self.at(0.0, SAMPLE, 0)
        tick = self.policy.tick_s
        if tick:
            self.at(0.0, TICK, 0)
        self.policy.attach(self)
        heap, end = self._heap, self.duration_s
        handlers = (
            self._arrive,
            self._ready,
            self._prefill_done,
            self._decode_done,
            self._tool_end,
            self._lease_end,
            self._tick,
            self._sample,
            self._lane_wake,
        )
        next_report = 0.0
        while heap and heap[0][0] <= end:
            t, _, kind, a = heapq.heappop(heap)
            self.now = t
            handlers[kind](a)
            if progress is not None and t >= next_report:
                progress(t)
                next_report = t + 5.0
        self.now = end
        return self.rec

    def _arrive(self, sid: int) -> None:
        self.rec.started(sid, self.now)
        self._ready(sid)

    def _ready(self, sid: int) -> None:
        self.ready_s[sid] = self.now
        self.next_use_s[sid] = self.now
        r = self.policy.place(sid, self.step[sid], self.now)
        self.where[sid] = r
        rep = self.replicas[r]
        s = self.sessions[sid]
        self._seq += 1
        self.priority[sid] = self.policy.step_priority(sid)
        heapq.heappush(rep.queue, (-self.priority[sid], self._seq, sid))
        # what the step will prefill if its cache here (or the one it loads) survives
        prompt = s.context_before_step(self.step[sid])
        pool = rep.pool
        src = self.policy.kv_source(sid)
        if src >= 0 and src != r:
            pool = self.replicas[src].pool
        cached = max(pool.gpu.get(sid, 0), pool.host.get(sid, 0)) * self.model.block_size_tokens
        est = max(0, prompt - cached)
        self.queued_est[sid] = est
        rep.queued_prefill_tokens += est
        self.try_admit(r)

    def try_admit(self, r: int) -> None:
        """Start queued steps on replica ``r`` while memory and batch slots allow."""
        rep = self.replicas[r]
        pool = rep.pool
        m = self.model
        while rep.queue and rep.running < m.max_running_steps:
            sid = rep.queue[0][2]
            s = self.sessions[sid]
            i = self.step[sid]
            prompt = s.context_before_step(i)
            need = min(m.blocks(prompt + s.output_tokens[i]), pool.cap)
            have = pool.gpu.get(sid, 0)
            if pool.free < need - have:
                self.policy.evict(pool, need - have, self.now, sid)
                if pool.free < need - have:
                    return  # head of line waits for memory
            heapq.heappop(rep.queue)
            rep.queued_prefill_tokens -= self.queued_est[sid]
            self._admit(sid, r, prompt, need)

    def _admit(self, sid: int, r: int, prompt: int, need: int) -> None:
        rep = self.replicas[r]
        pool, m, now = rep.pool, self.model, self.now
        s = self.sessions[sid]
        i = self.step[sid]
        bs = m.block_size_tokens
        gpu_hit = min(pool.gpu.get(sid, 0) * bs, prompt)
        own_hit = min(pool.own_blocks(sid) * bs, prompt)  # prefetched blocks were misses
        host_hit = max(0, min(pool.host.get(sid, 0) * bs, prompt) - gpu_hit)
        shared_hit = 0
        if i == 0 and s.parent >= 0 and gpu_hit == 0:
            # a worker starts from its planner's prefix (vLLM prefix sharing)
            shared_hit = min(pool.gpu.get(s.parent, 0) * bs, s.shared_prefix_tokens, prompt)
        moved_hit, moved_s = self._load_from_peer(sid, r, prompt, gpu_hit + host_hit)
        hit = gpu_hit + host_hit + shared_hit + moved_hit
        start = max(now, pool.ready_at.pop(sid, 0.0))
        reload_s = m.reload_s(host_hit) + moved_s
        if host_hit:
            pool.drop_host(sid)
        pool.hold(sid, need)
        prefill_s = m.extend_s(hit, prompt)
        seen = max(self.computed_tokens[sid], shared_hit if i == 0 else 0)
        recompute_tokens = max(0, min(seen, prompt) - hit)
        recompute_s = m.extend_s(hit, hit + recompute_tokens)
        self.lane_ready_s[sid] = start + reload_s
        self.lane_prefill_s[sid] = prefill_s
        rep.lane_pending_s += prefill_s
        self._seq += 1
        heapq.heappush(rep.lane, (-self.priority[sid], self._seq, sid))
        rep.running += 1
        self.next_use_s[sid] = math.inf
        self.rec.admitted(
            sid,
            r,
            now,
            prompt,
            hit,
            recompute_tokens,
            prefill_s,
            recompute_s,
            m.blocks(prompt),
            need,
            own_hit,
        )
        if self.events is not None:
            self._trace(sid, "step_start", prompt, s.output_tokens[i])
        self.policy.on_admit(sid, i, r, now)
        self._next_prefill(rep)

    def _load_from_peer(self, sid: int, r: int, prompt: int, local_hit: int) -> tuple[int, float]:
        """Tokens (and seconds) a step admitted on ``r`` loads from the replica Place named.

        Through the host tier the two share: from the source's GPU, out over its
        link and in over ``r``'s (two crossings); from its host tier, one. What
        was loaded counts as a hit (it was not recomputed) but not as an own hit
        (like a host-tier reload, it is a miss for the oracle comparison). The
        source's copy stays until the engine releases it (the step's STEP_START).
        """
        src = self.policy.kv_source(sid)  # as Place said when the step was queued
        if src < 0 or src == r:
            return 0, 0.0
        m = self.model
        peer = self.replicas[src].pool
        on_gpu = peer.gpu.get(sid, 0) * m.block_size_tokens
        held = max(on_gpu, peer.host.get(sid, 0) * m.block_size_tokens)
        tokens = max(0, min(held, prompt) - local_hit)
        if tokens <= 0:
            return 0, 0.0
        crossings = 2 if on_gpu >= held else 1
        self.rec.moved_tokens += tokens
        return tokens, crossings * m.reload_s(tokens)

    def _next_prefill(self, rep: Replica) -> None:
        """Start the highest-priority admitted prefill whose KV is in place, if the lane is free.

        A step whose KV is still being copied in (a host-tier reload, a load from
        another replica) waits off the lane, as a step waiting for remote KV does
        in vLLM: the copy runs on the link while the lane prefills other steps,
        and the lane wakes when the first copy lands.
        """
        if not rep.lane or rep.lane_free_s > self.now:
            return
        loading: list[tuple[int, int, int]] = []
        sid = -1
        while rep.lane:
            entry = heapq.heappop(rep.lane)
            if self.lane_ready_s[entry[2]] <= self.now:
                sid = entry[2]
                break
            loading.append(entry)
        for entry in loading:
            heapq.heappush(rep.lane, entry)
        if sid < 0:
            wake = min(self.lane_ready_s[e[2]] for e in loading)
            if rep.wake_s != wake:
                rep.wake_s = wake
                self.at(wake, LANE_WAKE, rep.index)
            return
        prefill_s = self.lane_prefill_s[sid]
        rep.lane_pending_s -= prefill_s
        done = self.now + prefill_s
        rep.lane_free_s = done
        self.at(done, PREFILL_DONE, sid)

    def _lane_wake(self, r: int) -> None:
        rep = self.replicas[r]
        if rep.wake_s == self.now:
            rep.wake_s = -1.0
        self._next_prefill(rep)

    def _prefill_done(self, sid: int) -> None:
        rep = self.replicas[self.where[sid]]
        self._next_prefill(rep)
        s = self.sessions[sid]
        i = self.step[sid]
        ctx = s.context_before_step(i)
        rep.running_kv_tokens += ctx
        busy_s = max(0.0, rep.lane_free_s - self.now) + rep.lane_pending_s
        decode_s = self.model.decode_s(s.output_tokens[i], rep.running_kv_tokens, busy_s)
        self.rec.first_token(sid, self.now - self.ready_s[sid], decode_s / max(1, rep.running))
        self.at(self.now + decode_s, DECODE_DONE, sid)

    def _decode_done(self, sid: int) -> None:
        r = self.where[sid]
        rep = self.replicas[r]
        s = self.sessions[sid]
        i = self.step[sid]
        rep.running -= 1
        rep.running_kv_tokens -= s.context_before_step(i)
        ctx = s.context_before_step(i) + s.output_tokens[i]
        self.computed_tokens[sid] = max(self.computed_tokens[sid], ctx)
        self.steps_done += 1
        pool = rep.pool
        pool.idle(sid)
        if self.events is not None:
            last = i == s.steps - 1
            self._trace(sid, "session_finish" if last else "tool_call_wait", ctx, 0)
        if i == s.steps - 1:
            self.rec.finished(sid, self.now)
            pool.finish(sid)
            self.policy.on_finish(sid, r, self.now)
            queue = self.backlog.get(s.tenant_id)
            if queue and s.parent < 0:
                self.at(self.now, ARRIVE, queue.popleft())  # closed loop: the next task
            if s.parent >= 0:
                self.pending_children[s.parent] -= 1
                if self.pending_children[s.parent] == 0:
                    self.at(self.now, TOOL_END, s.parent)
        else:
            if i == s.join_after_step and s.children:
                self.pending_children[sid] = len(s.children)
                self.next_use_s[sid] = self.now + 60.0  # unknown: the workers decide
                for c in s.children:
                    self.at(self.now, ARRIVE, c)
            else:
                self.next_use_s[sid] = self.now + s.tool_latency_s[i]
                self.at(self.now + s.tool_latency_s[i], TOOL_END, sid)
            self.policy.on_step_end(sid, i, r, self.now)
        self.try_admit(r)

    def _trace(self, sid: int, kind: str, ctx: int, new: int) -> None:
        s = self.sessions[sid]
        i = self.step[sid]
        ev = {
            "t": self.now,
            "kind": kind,
            "session": s.session_id,
            "tenant": s.tenant_id,
            "agent_type": s.agent_type,
            "step": i,
            "context_tokens": ctx,
            "new_tokens": new,
            "worker": f"r{self.where[sid]}",
        }
        if kind == "tool_call_wait":
            ev["tool"] = s.tool_names[i] or "join"
            ev["expected_tool_latency_s"] = s.tool_latency_s[i]
        self.events.append(ev)  # type: ignore[union-attr]

    def _tool_end(self, sid: int) -> None:
        self.policy.on_tool_end(sid, self.step[sid], self.now)
        if self.events is not None:
            s = self.sessions[sid]
            i = self.step[sid]
            self._trace(sid, "tool_call_end", s.context_before_step(i) + s.output_tokens[i], 0)
        self.step[sid] += 1
        self._ready(sid)

    def queued_prefill_tokens(self, r: int) -> int:
        """Prefill work waiting on ``r``: queued steps' uncached tokens plus the lane backlog."""
        rep = self.replicas[r]
        backlog_s = max(0.0, rep.lane_free_s - self.now) + rep.lane_pending_s
        return rep.queued_prefill_tokens + int(backlog_s * self.model.prefill_tokens_per_s)

    def lease(self, r: int, sid: int, ttl_s: float) -> None:
        """Hold ``sid``'s blocks on ``r`` for ``ttl_s`` (a lease: it ends by itself)."""
        until = self.now + ttl_s
        if self.replicas[r].pool.lease(sid, until):
            self.at(until, LEASE_END, r * len(self.sessions) + sid)

    def _lease_end(self, key: int) -> None:
        r, sid = divmod(key, len(self.sessions))
        pool = self.replicas[r].pool
        until = pool.lease_until.get(sid)
        if until is not None and until <= self.now:
            pool.idle(sid)
            self.try_admit(r)

    def _tick(self, _: int) -> None:
        self.policy.on_tick(self.now)
        self.at(self.now + self.policy.tick_s, TICK, 0)

    def _sample(self, _: int) -> None:
        self.rec.sample(self.now, self.replicas, self.where)
        self.at(self.now + self.sample_s, SAMPLE, 0)
