"""Retention policy: what happens to a session's KV while it is not running.

At TOOL_CALL_WAIT the graph predicts the rest of the wait; the retention
kernel prices retain / offload / release in GPU seconds and a retain gets the
ski-rental TTL; when it runs out the session switches to the cheaper
alternative. An offload plans a prefetch so the KV is back on the GPU before
the predicted return (if the pool has room for it then). Under memory pressure the eviction kernel picks
victims among a worker's idle residents. When a worker's shadow price rises,
its waiting sessions are re-decided and a lease can be cut short.

Tenant KV quotas bend all of this: a tenant over its GPU quota gets no new
retain (the next-best alternative instead) and no prefetch that would add to
it, its idle sessions are the first victims under pressure, and ``enforce_quotas``
evicts its idle sessions until it is back under; an offload that would put a
tenant over its host quota releases instead. The reason these carry is
``over_quota``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from scheduler_service.costs import prefill_time_s
from scheduler_service.domain import Action
from scheduler_service.engine_config import EngineConfig
from scheduler_service.fairness import FairShare
from scheduler_service.graph import GraphStore, WaitPrediction
from scheduler_service.kernels import KernelSet
from scheduler_service.kernels.pressure import PRICE_EPSILON
from scheduler_service.kernels.retention import OFFLOAD_HOST, RELEASE, RETAIN_GPU
from scheduler_service.quotas import TenantQuotas
from scheduler_service.state import (
    NO_SLOT,
    NO_TIMER,
    STATE_RUNNING,
    STATE_TOOL_WAIT,
    TIER_GPU,
    TIER_HOST,
    ClusterState,
)

#: emit(session slot, action, lease TTL s, complete within s, reason)
Emit = Callable[[int, Action, float, float, str], None]
#: set_timer(session slot, due s, kind)
SetTimer = Callable[[int, float, int], None]

TIMER_LEASE = 1
TIMER_PREFETCH = 2
PREFETCHED = -1.0

#: A re-decided lease is only replaced when it shrinks by more than this.
_LEASE_CUT_SLACK_S = 0.5

#: Eviction protection of a tenant over its GPU quota: its idle sessions' keys
#: grow by 10^9, so under pressure they go before any other tenant's.
OVER_QUOTA_PROTECTION = 1e-9
OVER_QUOTA = "over_quota"


class Retention:
    """Decides retain / offload / release / evict / prefetch for sessions."""

    def __init__(
        self,
        config: EngineConfig,
        state: ClusterState,
        kernels: KernelSet,
        fair: FairShare,
        graphs: GraphStore,
        emit: Emit,
        set_timer: SetTimer,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.kernels = kernels
        self.fair = fair
        self.graphs = graphs
        self.emit = emit
        self.set_timer = set_timer
        self.quotas = quotas if quotas is not None else TenantQuotas(state)

    # -- prices ------------------------------------------------------------------

    def shadow_price(self, w: int) -> float:
        """GPU-seconds per second that holding all of ``w``'s KV memory costs now.

        # NOTE: zero while the pool is under ``idle_utilization`` (holding is
        # free when nobody needs the memory), rising quadratically to
        # ``max_shadow_price`` when full, plus a term for queued prefill demand
        # that would use the memory if it were free.
        """
        c = self.config
        ws = self.state.workers
        cap = int(ws.gpu_cap_blocks_v[w])
        if cap <= 0:
            return c.max_shadow_price
        util = int(ws.gpu_used_blocks_v[w]) / cap
        over = max(0.0, (util - c.idle_utilization) / (1.0 - c.idle_utilization))
        demand_s = int(ws.queued_prefill_tokens_v[w]) / float(ws.prefill_tokens_per_s_v[w])
        # NOTE: m * m, not m ** 2: libm's pow(m, 2) is off by an ulp now and
        # then, and ``prices`` (numpy) and the event kernel both square exactly
        m = min(over, 1.0)
        return c.max_shadow_price * (m * m) + c.demand_weight * demand_s / (
            demand_s + c.demand_horizon_s
        )

    def rebuild_s(self, s: int, w: int) -> float:
        """GPU seconds to recompute session ``s``'s whole context on ``w``."""
        ss, ws = self.state.sessions, self.state.workers
        return prefill_time_s(
            float(ss.context_tokens_v[s]),
            float(ws.prefill_tokens_per_s_v[w]),
            self.config.knee_tokens,
        )

    def transfer_s(self, s: int, w: int, blocks: int) -> float:
        """Seconds to copy ``blocks`` of session ``s`` across ``w``'s host link."""
        ws = self.state.workers
        nbytes = blocks * int(ws.block_size_tokens_v[w]) * int(ws.bytes_per_token_v[w])
        return nbytes / float(ws.host_link_bytes_per_s_v[w])

    def host_room(self, w: int, blocks: int) -> bool:
        """True when ``w``'s host tier can take ``blocks`` more."""
        ws = self.state.workers
        return int(ws.host_cap_blocks_v[w]) - int(ws.host_used_blocks_v[w]) >= blocks > 0

    def host_quota_allows(self, s: int, w: int, blocks: int) -> bool:
        """True when offloading ``blocks`` of ``s`` to ``w``'s host keeps its tenant in quota."""
        t = int(self.state.sessions.tenant_v[s])
        return self.quotas.host_allows(t, blocks * int(self.state.workers.block_bytes_v[w]))

    # -- the tool wait --------------------------------------------------------------

    def predict(
        self, s: int, node: int, now: float, hint_s: float, last_step: bool
    ) -> WaitPrediction:
        """The graph's prediction for session ``s`` waiting in ``node`` since its wait began."""
        ss = self.state.sessions
        graph = self.graphs.graphs[int(ss.agent_v[s])]
        waited = max(0.0, now - float(ss.wait_started_s_v[s]))
        pred = graph.predict(node, waited, now, self.kernels.remaining_time, hint_s)
        if last_step:
            # the agent said this is its last step: little chance it comes back
            pred = WaitPrediction(
                pred.expected_remaining_s, pred.early_remaining_s, 0.0, pred.expected_next_tokens
            )
        return pred

    def decide_wait(self, s: int, pred: WaitPrediction, now: float, reason: str) -> None:
        """Choose and emit retain / offload / release for a waiting session on the GPU."""
        c = self.config
        ss, ws = self.state.sessions, self.state.workers
        w = int(ss.home_v[s])
        blocks = int(ss.gpu_blocks_v[s])
        price = self.shadow_price(w)
        ss.next_use_s_v[s] = now + pred.expected_remaining_s
        ss.p_continue_v[s] = pred.p_continue
        ws.price_at_decision_v[w] = max(float(ws.price_at_decision_v[w]), price)
        move_s = self.transfer_s(s, w, blocks)
        rebuild_s = self.rebuild_s(s, w)
        room = self.host_room(w, blocks)
        host_ok = room and self.host_quota_allows(s, w, blocks)

        def choose(host: bool) -> tuple[int, float, float, float, float]:
            return self.kernels.retention_choice(  # type: ignore[no-any-return]
                blocks,
                int(ws.gpu_cap_blocks_v[w]),
                price,
                pred.expected_remaining_s,
                pred.p_continue,
                rebuild_s,
                move_s,
                move_s,  # the link is symmetric: reload takes what the copy out took
                host,
                c.transfer_weight,
                c.min_lease_ttl_s,
                c.max_lease_ttl_s,
            )

        action, ttl, _cr, c_offload, c_release = choose(host_ok)
        if room and not host_ok and choose(True)[0] == OFFLOAD_HOST:
            reason = OVER_QUOTA  # the host quota turned an offload into this
        if action == RETAIN_GPU and self.quotas.over_gpu(int(ss.tenant_v[s])):
            # no new retain over the GPU quota: the cheaper of the alternatives
            action = OFFLOAD_HOST if host_ok and c_offload <= c_release else RELEASE
            reason = OVER_QUOTA
        if action == RETAIN_GPU:
            ss.price_at_grant_v[s] = price
            expires = now + ttl
            current = float(ss.lease_expires_s_v[s])
            if current and expires >= current - _LEASE_CUT_SLACK_S:
                return  # the lease already granted still stands
            ss.lease_expires_s_v[s] = expires
            self.set_timer(s, expires, TIMER_LEASE)
            self.emit(s, Action.RETAIN_GPU, ttl, 0.0, reason)
        elif action == OFFLOAD_HOST:
            self.state.to_host(s)
            ss.lease_expires_s_v[s] = 0.0
            self.emit(s, Action.OFFLOAD_HOST, 0.0, move_s, reason)
            self.plan_prefetch(s, pred, now, move_s)
        else:
            self.state.release(s)
            ss.lease_expires_s_v[s] = 0.0
            ss.timer_due_s_v[s] = NO_TIMER
            self.emit(s, Action.RELEASE, 0.0, 0.0, reason)

    def hold_until_step(self, s: int, now: float, leased_until: float) -> None:
        """Lease a returned session's blocks until its next step is likely admitted.

        Its next use is now, but the step waits in its home's queue first; without
        a lease the worker's own LRU evicts the blocks of exactly the session it
        is about to run (the nearest next use there is). The TTL covers twice the
        reported queue wait; a lease still running that long is left alone.
        """
        c = self.config
        ws, ss = self.state.workers, self.state.sessions
        w = int(ss.home_v[s])
        if ss.gpu_blocks_v[s] <= 0 or self.quotas.over_gpu(int(ss.tenant_v[s])):
            return
        queue_s = float(ws.queued_prefill_tokens_v[w]) / float(ws.prefill_tokens_per_s_v[w])
        ttl = min(c.max_lease_ttl_s, c.min_lease_ttl_s + 2.0 * queue_s)
        if leased_until - now >= ttl:
            return
        self.emit(s, Action.RETAIN_GPU, ttl, 0.0, "tool_returned")

    def plan_prefetch(self, s: int, pred: WaitPrediction, now: float, offload_s: float) -> None:
        """Schedule the reload so it completes before the early end of the wait."""
        ss = self.state.sessions
        if pred.p_continue <= 0.0:
            ss.timer_due_s_v[s] = NO_TIMER
            return  # nothing will come back to use it
        w = int(ss.home_v[s])
        reload_s = self.transfer_s(s, w, int(ss.host_blocks_v[s]))
        lead_s = reload_s * (1.0 + self.config.prefetch_margin)
        at = now + max(offload_s, pred.early_remaining_s - lead_s)
        ss.prefetch_at_s_v[s] = at
        self.set_timer(s, at, TIMER_PREFETCH)

    def prefetch(self, s: int, now: float, reason: str) -> bool:
        """Bring a host-tier session back to its home GPU, leased until it is used.

        False (and nothing done) when the reload would put the session's tenant
        over its GPU quota: the KV stays on the host until the step needs it.
        """
        ss = self.state.sessions
        w = int(ss.home_v[s])
        blocks = int(ss.host_blocks_v[s])
        extra = blocks * int(self.state.workers.block_bytes_v[w])
        if not self.quotas.gpu_allows(int(ss.tenant_v[s]), extra):
            ss.prefetch_at_s_v[s] = 0.0
            return False
        reload_s = self.transfer_s(s, w, blocks)
        node = int(ss.node_v[s])
        waiting = ss.state_v[s] == STATE_TOOL_WAIT
        if waiting and node != NO_SLOT:
            # hold it for what is left of the wait, given how long it has lasted
            pred = self.predict(s, node, now, float(ss.hint_s_v[s]), ss.p_continue_v[s] == 0.0)
            ss.next_use_s_v[s] = now + pred.expected_remaining_s
        until_use_s = max(0.0, float(ss.next_use_s_v[s]) - now)
        self.state.set_gpu_blocks(s, blocks)
        # NOTE: -1 marks "reloaded for a use that is due": re-pricing must not
        # send it straight back out (that would thrash the host link).
        ss.prefetch_at_s_v[s] = PREFETCHED
        ttl = max(self.config.min_lease_ttl_s, 2.0 * until_use_s + reload_s)
        if waiting:
            ss.lease_expires_s_v[s] = now + ttl
            self.set_timer(s, now + ttl, TIMER_LEASE)
        else:
            ss.lease_expires_s_v[s] = 0.0
            ss.timer_due_s_v[s] = NO_TIMER
        # due by the early end of the wait the prefetch was planned for (it was
        # started one reload plus margin ahead of it); on a returned tool, at once
        within_s = reload_s * (1.0 + self.config.prefetch_margin) if waiting else reload_s
        self.emit(s, Action.PREFETCH_GPU, ttl, within_s, reason)
        return True

    def rejected(self, s: int, action: Action) -> None:
        """The home worker refused a directive: put the session back where its KV is."""
        ss = self.state.sessions
        if action is Action.OFFLOAD_HOST and ss.tier_v[s] == TIER_HOST:
            # the copy out never happened: the blocks are still on the GPU
            self.state.set_gpu_blocks(s, int(ss.host_blocks_v[s]))
            ss.prefetch_at_s_v[s] = 0.0
            ss.timer_due_s_v[s] = NO_TIMER
        elif action is Action.PREFETCH_GPU and ss.tier_v[s] == TIER_GPU:
            # the reload never happened: the blocks are still on the host
            self.state.to_host(s)
            ss.prefetch_at_s_v[s] = 0.0
            ss.lease_expires_s_v[s] = 0.0
            ss.timer_due_s_v[s] = NO_TIMER
        elif action is Action.RETAIN_GPU and ss.lease_expires_s_v[s]:
            # no lease on the worker: its own LRU may drop the blocks at any time
            ss.lease_expires_s_v[s] = 0.0
            if ss.timer_kind_v[s] == TIMER_LEASE:
                ss.timer_due_s_v[s] = NO_TIMER

    # -- timers ------------------------------------------------------------------------

    def on_timer(self, s: int, kind: int, now: float) -> None:
        """A lease ran out or a prefetch is due."""
        ss = self.state.sessions
        if kind == TIMER_LEASE and ss.tier_v[s] == TIER_GPU and ss.lease_expires_s_v[s]:
            # NOTE: ski rental: holding has now cost as much as the alternative,
            # so switch to it: to the host tier when that beats a rebuild, else
            # let go. The worker ends the lease by itself (a lease, not a pin),
            # but the blocks are still in its prefix cache for an offload.
            self.evict(s, int(ss.home_v[s]), now, "lease_expired", Action.RELEASE)
        elif kind == TIMER_PREFETCH and ss.tier_v[s] == TIER_HOST:
            w = int(ss.home_v[s])
            ws = self.state.workers
            free_after = int(ws.gpu_cap_blocks_v[w] - ws.gpu_used_blocks_v[w]) - int(
                ss.host_blocks_v[s]
            )
            if free_after < self.config.high_watermark * int(ws.gpu_cap_blocks_v[w]):
                # NOTE: reloading into a pool under pressure would only evict
                # someone else; the session reloads on demand when its tool returns.
                return
            self.prefetch(s, now, "prefetch_before_return")

    # -- pressure ----------------------------------------------------------------------

    def protection(self) -> npt.NDArray[np.float64]:
        """Eviction protection per tenant slot: fair share's, tiny for tenants over quota."""
        prot = self.fair.protection
        over = self.quotas.over_gpu_tenants() if self.quotas.gpu_limited else None
        if over:
            prot = prot.copy()
            prot[over] = OVER_QUOTA_PROTECTION
        return prot

    def relieve(self, w: int, now: float, exclude: int = NO_SLOT) -> None:
        """Evict idle sessions of ``w`` when its free memory is short.

        Short means under the low watermark, or under the blocks the prefill the
        worker reports queued will take: a queued step waits for memory that
        idle sessions' leases hold (the shadow price already counts that demand).
        Relief goes up to the high watermark, or to room for the queue.
        """
        c = self.config
        ws, ss = self.state.workers, self.state.sessions
        cap = int(ws.gpu_cap_blocks_v[w])
        free = cap - int(ws.gpu_used_blocks_v[w])
        # NOTE: counting the queue as memory demand gained 1% of completions on the
        # standard scenario and 3-4% on multitenant (seeds 1-3; docs/simulator.md)
        queued = -(-int(ws.queued_prefill_tokens_v[w]) // int(ws.block_size_tokens_v[w]))
        if cap <= 0 or free >= max(c.low_watermark * cap, queued):
            return
        need = max(math.ceil(c.high_watermark * cap), queued) - free
        victims = self.kernels.rank_victims(
            int(ws.head_v[w]),
            ss.next,
            ss.tier,
            ss.state,
            ss.gpu_blocks,
            ss.context_tokens,
            ss.next_use_s,
            ss.p_continue,
            ss.tenant,
            self.protection(),
            float(now),
            float(ws.prefill_tokens_per_s_v[w]),
            float(c.knee_tokens),
            int(need),
            int(exclude),
        )
        for v in victims:
            self.evict(int(v), w, now)

    def enforce_quotas(self, now: float) -> None:
        """Evict idle GPU sessions of each tenant over its GPU quota until it is back under.

        A tenant's candidates are its sessions on a GPU that are not running a
        step, taken in the eviction kernel's order (farthest next use per
        second of rebuild first, lower slot on ties). One vectorised pass over
        the session arrays, and only while some tenant is over.
        """
        over = self.quotas.over_gpu_tenants() if self.quotas.gpu_limited else None
        if not over:
            return
        ss = self.state.sessions
        hw = ss.high_water
        idle = (
            (ss.tier[:hw] == TIER_GPU)
            & (ss.state[:hw] != STATE_RUNNING)
            & (ss.gpu_blocks[:hw] > 0)
            & (ss.home[:hw] != NO_SLOT)
        )
        for t in over:
            cand = np.flatnonzero(idle & (ss.tenant[:hw] == t))
            if not cand.size:
                continue
            keys = self.victim_keys(cand, now)
            for s in cand[np.lexsort((cand, -keys))].tolist():
                if not self.quotas.over_gpu(t):
                    break
                self.evict(s, int(ss.home_v[s]), now, OVER_QUOTA)

    def victim_keys(self, cand: npt.NDArray[np.intp], now: float) -> npt.NDArray[np.float64]:
        """The eviction kernel's ``victim_key`` (protection 1) of sessions ``cand``."""
        ss = self.state.sessions
        keys = np.empty(cand.shape[0], dtype=np.float64)
        self.kernels.victim_keys(
            cand,
            ss.next_use_s,
            ss.p_continue,
            ss.gpu_blocks,
            ss.context_tokens,
            ss.home,
            self.state.workers.prefill_tokens_per_s,
            float(now),
            float(self.config.knee_tokens),
            keys,
        )
        return keys

    def evict(
        self,
        s: int,
        w: int,
        now: float,
        reason: str = "pressure",
        otherwise: Action = Action.EVICT_NOW,
    ) -> None:
        """Free a session's GPU blocks: to the host tier when that is cheaper than rebuilding."""
        ss = self.state.sessions
        blocks = int(ss.gpu_blocks_v[s])
        waiting = ss.state_v[s] == STATE_TOOL_WAIT and ss.node_v[s] != NO_SLOT
        pred = None
        if waiting:
            pred = self.predict(
                s, int(ss.node_v[s]), now, float(ss.hint_s_v[s]), ss.p_continue_v[s] == 0.0
            )
        pc = pred.p_continue if pred is not None else float(ss.p_continue_v[s])
        move_s = self.transfer_s(s, w, blocks)
        ss.lease_expires_s_v[s] = 0.0
        ss.timer_due_s_v[s] = NO_TIMER
        pays = self.config.transfer_weight * 2.0 * move_s < pc * self.rebuild_s(s, w)
        if pays and self.host_room(w, blocks) and not self.host_quota_allows(s, w, blocks):
            pays = False  # the host quota is full: release instead
            reason = OVER_QUOTA
        if self.host_room(w, blocks) and pays:
            self.state.to_host(s)
            self.emit(s, Action.OFFLOAD_HOST, 0.0, move_s, reason)
            if pred is not None:
                self.plan_prefetch(s, pred, now, move_s)
        else:
            self.state.release(s)
            self.emit(s, otherwise, 0.0, 0.0, reason)

    def redecide_pricier_workers(self, now: float) -> None:
        """Re-price the waiting leases of every worker whose shadow price rose enough."""
        c = self.config
        ws = self.state.workers
        n = ws.high_water
        if n == 0:
            return
        out = np.empty(n, dtype=np.int64)
        # cheaper now: later rises are measured from here (price_at_decision falls)
        k = self.kernels.pricier_workers(
            ws.gpu_cap_blocks, ws.gpu_used_blocks, ws.queued_prefill_tokens,
            ws.prefill_tokens_per_s, ws.residents, ws.connected, ws.price_at_decision[:n],
            c.idle_utilization, c.max_shadow_price, c.demand_weight, c.demand_horizon_s,
            c.redecide_price_ratio, out,
        )  # fmt: skip
        for w in out[:k].tolist():
            self.redecide_if_pricier(w, now)

    def redecide_if_pricier(self, w: int, now: float) -> None:
        """Re-price ``w``'s waiting leases when its shadow price rose enough."""
        ws, ss = self.state.workers, self.state.sessions
        price = self.shadow_price(w)
        before = float(ws.price_at_decision_v[w])
        if price <= before * self.config.redecide_price_ratio + PRICE_EPSILON:
            if price < before:
                ws.price_at_decision_v[w] = price  # cheaper now: rises are measured from here
            return
        ws.price_at_decision_v[w] = price
        # only leases priced well below today's price can have become too long.
        # NOTE: listed before any is re-decided: a decision changes only its own
        # session's fields, none that picks the others
        out = np.empty(int(ws.residents_v[w]), dtype=np.int64)
        k = self.kernels.leases_priced_below(
            int(ws.head_v[w]), ss.next, ss.price_at_grant, ss.state, ss.tier, ss.node,
            ss.prefetch_at_s, price / self.config.redecide_price_ratio, out,
        )  # fmt: skip
        for s in out[:k].tolist():
            pred = self.predict(
                s, int(ss.node_v[s]), now, float(ss.hint_s_v[s]), ss.p_continue_v[s] == 0.0
            )
            self.decide_wait(s, pred, now, "pressure_redecide")
