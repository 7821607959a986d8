"""The decision engine: the one entry point the service, simulator and load test drive.

Time is an argument: every method takes ``now`` (seconds) and the engine never
reads a clock, so a journal replay or a simulation reproduces every decision,
directive ids included.

The engine composes the parts: ``state`` (struct-of-arrays cluster state),
``graph`` (what each agent type does next and for how long), ``kernels``
(numba scoring, ranking and pricing), ``placement``, ``retention`` and
``fairness``. This module routes session events to them and owns directive
ids and timers; ``engine_checks`` validates batches, ``engine_workers``
handles worker messages and ``engine_read`` builds the operator views.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import repeat

import numpy as np

from scheduler_service import engine_batch
from scheduler_service import kernels as kernel_sets
from scheduler_service.costs import blocks_for, prefill_time_s
from scheduler_service.domain import (
    NO_DECISIONS,
    Action,
    ClusterStatsView,
    Decisions,
    DirectiveId,
    DirectiveOutcome,
    EventKind,
    KvEvent,
    Placement,
    PlaceRequest,
    PoolInventory,
    RetentionDirective,
    SessionEvent,
    SessionId,
    SessionView,
    TenantId,
    TenantLimitExceeded,
    TenantSpec,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
    WorkerView,
)
from scheduler_service.engine_batch import BatchPath
from scheduler_service.engine_checks import check_events
from scheduler_service.engine_config import DECODE_FLOOR_DRIFT, EngineConfig
from scheduler_service.engine_read import cluster_stats, session_view, worker_view
from scheduler_service.engine_workers import WorkerEvents
from scheduler_service.fairness import FairShare
from scheduler_service.graph import FINISH_NODE, GraphStore
from scheduler_service.placement import Placer
from scheduler_service.prefix_index import PrefixIndex
from scheduler_service.quotas import TenantQuotas
from scheduler_service.retention import OVER_QUOTA, Retention
from scheduler_service.sent_directives import SentDirectives
from scheduler_service.state import (
    NO_SLOT,
    NO_TIMER,
    STATE_IDLE,
    STATE_RUNNING,
    STATE_TOOL_WAIT,
    TIER_GPU,
    TIER_HOST,
    TIER_NONE,
    ClusterState,
    Interned,
)

_K_START = EventKind.STEP_START
_K_WAIT = EventKind.TOOL_CALL_WAIT
_K_TOOL_END = EventKind.TOOL_CALL_END
_K_STEP_END = EventKind.STEP_END
_K_FINISH = EventKind.SESSION_FINISH
_K_ABORT = EventKind.SESSION_ABORT

#: Directives remembered until acked: the most recent this many sequences
#: (older ones are forgotten first; ~25 B each)
UNACKED_MEMORY = 1 << 18
#: Agent types with a graph of their own; later ones share one graph.
MAX_AGENT_TYPES = 512
# seconds of event time between two passes over the sessions for fair share
LIVE_SLOWDOWN_EVERY_S = 1.0
OTHER_AGENT_TYPE = "*other*"


class Engine:
    """Tracks the cluster and decides placement and retention."""

    def __init__(self, config: EngineConfig | None = None, leader_epoch: int = 1) -> None:
        self.config = config or EngineConfig()
        self.leader_epoch = leader_epoch
        self.kernels = (
            kernel_sets.REFERENCE if self.config.use_reference_kernels else kernel_sets.NUMBA
        )
        self.state = ClusterState()
        self.fair = FairShare()
        self.agents: Interned[str] = Interned()
        self.graphs = GraphStore(self.config.graph_prior)
        self._tenants: dict[TenantId, TenantSpec] = {}
        self._directive_seq = 0
        self._out: list[RetentionDirective] = []
        # what an ack needs of the directives sent and not yet acked
        self._unacked = SentDirectives(UNACKED_MEMORY)
        self.events_total = 0
        self._live_pass_s = -math.inf
        # no live session that the silent-session scan could expire had its
        # last event before this (-inf: scan at the next tick)
        self._quiet_since_s = -math.inf
        self.placements_total = 0
        self.directives_total = 0
        self.acks: dict[DirectiveOutcome, int] = dict.fromkeys(DirectiveOutcome, 0)
        self.quotas = TenantQuotas(self.state)
        self.retention = Retention(
            self.config,
            self.state,
            self.kernels,
            self.fair,
            self.graphs,
            self._emit,
            self._set_timer,
            self.quotas,
        )
        self.prefix = PrefixIndex(self.config.prefix_index_blocks)
        self.placer = Placer(self.config, self.state, self.kernels, self.fair, self.prefix)
        self._workers = WorkerEvents(self.state, self.retention)
        self._batch = BatchPath(self)
        self._handlers = {
            _K_START: self._step_start,
            _K_WAIT: self._tool_wait,
            _K_TOOL_END: self._tool_end,
            _K_STEP_END: self._step_end,
            _K_FINISH: self._session_finish,
            _K_ABORT: self._session_abort,
        }
        self.warm()

    def __getstate__(self) -> dict[str, object]:
        # the batch path holds typed lists of the graphs' arrays: rebuilt on load
        return {k: v for k, v in self.__dict__.items() if k != "_batch"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_quiet_since_s", -math.inf)  # a snapshot from before it
        if isinstance(self._unacked, OrderedDict):  # a snapshot from before the ring
            sent = SentDirectives(UNACKED_MEMORY)
            pairs = self._unacked.values()
            sent.restore(list(self._unacked), [p[0] for p in pairs], [int(p[1]) for p in pairs])
            self._unacked = sent
        self._batch = BatchPath(self)
        # a snapshot written before kernel sets pickled by name holds a copy of
        # one: run on this process's own set (the batch path checks identity)
        self.use_kernels(kernel_sets.by_name(self.kernels.name))

    def use_kernels(self, kernels: kernel_sets.KernelSet) -> None:
        """Run on another kernel set from now on (the benchmark compares the twins)."""
        self.kernels = self.retention.kernels = self.placer.kernels = kernels
        self.warm()

    def warm(self) -> None:
        """Compile or load the kernels now, so no request pays for it (cheap when cached)."""
        if self.kernels is kernel_sets.NUMBA:
            kernel_sets.warm()
            engine_batch.warm()

    # -- workers -------------------------------------------------------------

    def register_worker(self, spec: WorkerSpec, now: float) -> Decisions:
        """Record a worker's Hello; a new epoch means it holds nothing any more."""
        w, restarted = self._workers.register(spec)
        self._batch.workers_changed()
        if restarted:
            self.prefix.forget_worker(w)
        return NO_DECISIONS

    def worker_epoch(self, worker_id: WorkerId) -> int | None:
        """The current epoch of a worker, or None when unknown."""
        w = self.state.workers.slot_of.get(worker_id)
        return None if w is None else int(self.state.workers.epoch[w])

    def worker_disconnected(self, worker_id: WorkerId, now: float) -> None:
        """Mark a worker's stream closed (its KV may still be there)."""
        self._workers.disconnected(worker_id)

    def heartbeat(self, worker_id: WorkerId, load: WorkerLoad, now: float) -> Decisions:
        """Record a worker's load; relieve pressure and re-price its leases."""
        self._workers.heartbeat(worker_id, load, now)
        self.placer.reported(self.state.workers.slot_of[worker_id])
        return self._flush()

    def drain_worker(self, worker_id: WorkerId, now: float) -> WorkerView:
        """Stop placing steps on a worker; KeyError when unknown."""
        w = self._workers.drain(worker_id)
        return worker_view(self.state, w)

    def kv_events(self, worker_id: WorkerId, events: Iterable[KvEvent], now: float) -> Decisions:
        """Track block usage from a worker's KV events (and which prompt blocks it holds)."""
        batch = tuple(events)
        self._workers.kv_events(worker_id, batch, now)
        self.prefix.apply(self.state.workers.slot_of[worker_id], batch)
        return self._flush()

    def reconcile(self, worker_id: WorkerId, inv: PoolInventory, now: float) -> Decisions:
        """Adopt a worker's inventory as the truth about residency."""
        self._workers.reconcile(worker_id, inv, now, self._new_session)
        return self._flush()

    def directive_acked(
        self,
        worker_id: WorkerId,
        directive_id: DirectiveId,
        outcome: DirectiveOutcome,
        reason: str,
        now: float,
    ) -> None:
        """Record a worker's answer; a rejected move means the KV stayed where it was."""
        self._workers.require(worker_id, "directive_ack")
        self.acks[outcome] = self.acks.get(outcome, 0) + 1
        sent = self._unacked.pop(directive_id)
        if sent is None or outcome is not DirectiveOutcome.REJECTED:
            return
        s = self.state.sessions.slot_of.get(sent[0])
        if s is not None and self.state.sessions.home[s] == self.state.workers.slot_of[worker_id]:
            self.retention.rejected(s, sent[1])

    # -- session events --------------------------------------------------------

    def check_events(self, events: Sequence[SessionEvent]) -> None:
        """Raise Rejected if any event of the batch is invalid; changes nothing."""
        check_events(self.state, self.fair.tenants.names, events)

    def handle_batch(
        self, events: Sequence[SessionEvent], now: float, *, checked: bool = False
    ) -> Decisions:
        """Validate a whole batch, then apply it; a bad event rejects the batch.

        ``checked``: the caller ran ``check_events`` on this batch and changed
        nothing the check reads since (sessions, tenants).
        """
        batch = self._batch
        cols = None
        if len(events) >= batch.min_batch and batch.usable():
            cols = batch.columns(events, check=not checked)
        elif not checked:
            check_events(self.state, self.fair.tenants.names, events)
        self.events_total += len(events)
        if now < self._quiet_since_s:
            self._quiet_since_s = now  # these events' sessions: last event now
        self.graphs.rescale_due(now)
        if cols is not None:
            batch.run(events, cols, now)
        else:
            self._apply_events(events, now)
        return self._flush()

    def _apply_events(self, events: Sequence[SessionEvent], now: float) -> None:
        """Apply checked events one by one (the batch path's reference twin)."""
        # NOTE: the per-event bookkeeping is inlined here with everything it
        # touches bound to locals: without the batch path, this is the hot path.
        ss = self.state.sessions
        slot_of = ss.slot_of
        worker_slot = self.state.workers.slot_of
        tenant_events = self.fair.events
        handlers = self._handlers
        for ev in events:
            s = slot_of.get(ev.session_id)
            kind = ev.kind
            if s is None:
                tenant_events[self.fair.slot(ev.tenant_id)] += 1
                if kind is _K_ABORT:
                    continue  # nothing to end
                s = self._new_session(ev.session_id, ev.tenant_id, ev.agent_type, now)
            else:
                tenant_events[ss.tenant_v[s]] += 1
            ss.events_v[s] += 1
            if ev.step_index > ss.step_index_v[s]:
                ss.step_index_v[s] = ev.step_index
            ss.last_event_s_v[s] = now
            if ev.worker_id:
                w = worker_slot[ev.worker_id]
                if w != ss.home_v[s]:
                    self._move_home(s, w)
            handlers[kind](s, ev, now)

    def handle(self, event: SessionEvent, now: float) -> Decisions:
        """Validate and apply one session event."""
        return self.handle_batch((event,), now)

    def _step_start(self, s: int, ev: SessionEvent, now: float) -> None:
        ss = self.state.sessions
        graph = self.graphs.graphs[int(ss.agent_v[s])]
        node = int(ss.node_v[s])
        prev_ctx = int(ss.context_tokens_v[s])
        if node != NO_SLOT and ss.state_v[s] != STATE_RUNNING:
            waited = now - float(ss.wait_started_s_v[s])
            # the wait in ``node`` ends here (a tool wait may end without TOOL_CALL_END)
            graph.observe_duration(node, waited, now)
        if node != NO_SLOT and ss.wait_started_s_v[s] >= 0.0:
            graph.observe_tokens(
                node, max(0, ev.context_tokens - int(ss.wait_context_tokens_v[s])), now
            )
            graph.observe_outcome(node, True, now)
            ss.wait_started_s_v[s] = -1.0  # outcome credited once per wait
        ss.state_v[s] = STATE_RUNNING
        ss.step_started_s_v[s] = now
        ss.lease_expires_s_v[s] = 0.0
        ss.prefetch_at_s_v[s] = 0.0
        ss.timer_due_s_v[s] = NO_TIMER
        ss.context_tokens_v[s] = ev.context_tokens
        w = int(ss.home_v[s])
        if w == NO_SLOT:
            return
        ws = self.state.workers
        rate = float(ws.prefill_tokens_per_s_v[w])
        # standalone time counts only the tokens this step adds (a perfect cache);
        # rebuilding evicted context is exactly the slowdown fair share measures
        added = max(0, ev.context_tokens - prev_ctx)
        ss.ideal_s_v[s] += prefill_time_s(float(added), rate, self.config.knee_tokens)
        blocks = blocks_for(ev.context_tokens + ev.new_tokens, int(ws.block_size_tokens_v[w]))
        self.state.set_gpu_blocks(s, blocks)
        self.retention.relieve(w, now, exclude=s)

    def _step_done(self, s: int, context_tokens: int, now: float) -> None:
        """A running step ended: credit its decode's standalone time to fair share."""
        ss = self.state.sessions
        started = float(ss.step_started_s_v[s])
        w = int(ss.home_v[s])
        ss.step_started_s_v[s] = -1.0
        out = context_tokens - int(ss.context_tokens_v[s])
        if started < 0.0 or w == NO_SLOT or out <= 0:
            return
        # NOTE: the step's time per output token, queueing and interference
        # included; the decaying minimum over a worker's steps approaches what
        # a step takes alone, and whatever it misses, it misses for everyone.
        ws = self.state.workers
        floor = float(ws.decode_s_per_token_v[w])
        if not ws.spec(w).cache.decode_tokens_per_s:
            seen = (now - started) / out
            floor = seen if floor <= 0.0 else min(floor * (1.0 + DECODE_FLOOR_DRIFT), seen)
            ws.decode_s_per_token_v[w] = floor
        # each output token reads the context so far: its mean over the step
        mean_ctx = int(ss.context_tokens_v[s]) + out / 2
        ss.ideal_s_v[s] += out * (floor + mean_ctx * float(ws.decode_s_per_context_token_v[w]))

    def _tool_wait(self, s: int, ev: SessionEvent, now: float) -> None:
        ss = self.state.sessions
        self._step_done(s, ev.context_tokens, now)
        graph = self.graphs.graphs[int(ss.agent_v[s])]
        node = graph.node((int(_K_WAIT), ev.tool_name), now, ev.expected_tool_latency_s)
        self._enter_node(s, node, ev, now)
        ss.state_v[s] = STATE_TOOL_WAIT
        # a new wait gets its own decision; a lease from an earlier one is superseded
        ss.lease_expires_s_v[s] = 0.0
        ss.hint_s_v[s] = ev.expected_tool_latency_s
        pred = self.retention.predict(s, node, now, ev.expected_tool_latency_s, ev.last_step)
        ss.next_use_s_v[s] = now + pred.expected_remaining_s
        ss.p_continue_v[s] = pred.p_continue
        w = int(ss.home_v[s])
        if w == NO_SLOT:
            return
        if ss.tier_v[s] == TIER_GPU:
            # the context now includes the step's output: that is what is held
            bs = int(self.state.workers.block_size_tokens[w])
            self.state.set_gpu_blocks(s, blocks_for(ev.context_tokens, bs))
            if ss.gpu_blocks_v[s] <= 0:
                if self.quotas.over_gpu(int(ss.tenant_v[s])):
                    # no lease over the GPU quota; with no size there is nothing to offload
                    self.state.release(s)
                    ss.timer_due_s_v[s] = NO_TIMER
                    self._emit(s, Action.RELEASE, 0.0, 0.0, OVER_QUOTA)
                    return
                # size unknown: a plain lease, the one decision that needs no price
                ttl = self.config.default_lease_ttl_s
                ss.lease_expires_s_v[s] = now + ttl
                self._set_timer(s, now + ttl, 1)
                self._emit(s, Action.RETAIN_GPU, ttl, 0.0, "tool_wait")
            else:
                self.retention.decide_wait(s, pred, now, "tool_wait")
        elif ss.tier_v[s] == TIER_HOST:
            self.retention.plan_prefetch(s, pred, now, 0.0)

    def _tool_end(self, s: int, ev: SessionEvent, now: float) -> None:
        ss = self.state.sessions
        node = int(ss.node_v[s])
        if ss.state_v[s] == STATE_TOOL_WAIT and node != NO_SLOT:
            waited = now - float(ss.wait_started_s_v[s])
            self.graphs.graphs[int(ss.agent_v[s])].observe_duration(node, waited, now)
            ss.ideal_s_v[s] += waited
        ss.state_v[s] = STATE_RUNNING
        ss.context_tokens_v[s] = max(int(ss.context_tokens_v[s]), ev.context_tokens)
        leased_until = float(ss.lease_expires_s_v[s])
        ss.lease_expires_s_v[s] = 0.0
        ss.timer_due_s_v[s] = NO_TIMER
        if ss.tier_v[s] == TIER_GPU and ss.home_v[s] != NO_SLOT:
            self.retention.hold_until_step(s, now, leased_until)
        elif ss.tier_v[s] == TIER_HOST and ss.home_v[s] != NO_SLOT:
            # the tool returned before the planned prefetch: reload now
            ss.next_use_s_v[s] = now
            self.retention.prefetch(s, now, "tool_returned")
        ss.prefetch_at_s_v[s] = 0.0

    def _step_end(self, s: int, ev: SessionEvent, now: float) -> None:
        ss = self.state.sessions
        self._step_done(s, ev.context_tokens, now)
        graph = self.graphs.graphs[int(ss.agent_v[s])]
        node = graph.node((int(_K_STEP_END), ""), now)
        self._enter_node(s, node, ev, now)
        ss.state_v[s] = STATE_IDLE
        pred = self.retention.predict(s, node, now, 0.0, ev.last_step)
        ss.next_use_s_v[s] = now + pred.expected_remaining_s
        ss.p_continue_v[s] = pred.p_continue
        w = int(ss.home_v[s])
        if w != NO_SLOT and ss.tier_v[s] == TIER_GPU:
            ws = self.state.workers
            self.state.set_gpu_blocks(
                s, blocks_for(ev.context_tokens, int(ws.block_size_tokens_v[w]))
            )
            self.retention.relieve(w, now)

    def _enter_node(self, s: int, node: int, ev: SessionEvent, now: float) -> None:
        ss = self.state.sessions
        prev = int(ss.node_v[s])
        if prev != NO_SLOT:
            self.graphs.graphs[int(ss.agent_v[s])].observe_transition(prev, node, now)
        ss.node_v[s] = node
        ss.wait_started_s_v[s] = now
        ss.context_tokens_v[s] = ev.context_tokens
        ss.wait_context_tokens_v[s] = ev.context_tokens

    def _session_finish(self, s: int, ev: SessionEvent, now: float) -> None:
        self._finish(s, True, now)

    def _observe_live_slowdowns(self, now: float) -> None:
        """Hand fair share each tenant's time in flight and standalone work so far.

        One pass over the session arrays (a kernel), at a completion at most
        once per ``LIVE_SLOWDOWN_EVERY_S`` of event time (not on a timer, so a
        replay of the same events computes the same figures; the time of the
        last pass is part of the engine, so of its snapshots). Per completion
        it made the cost of an event grow with the number of sessions.
        """
        if not self._live_pass_due(now):
            return
        self._live_pass_s = now
        ss = self.state.sessions
        hw = ss.high_water
        n = len(self.fair.weight)
        elapsed, ideal = np.empty(n), np.empty(n)
        self.kernels.live_work(
            ss.tenant[:hw], ss.started_s[:hw], ss.ideal_s[:hw], now, elapsed, ideal
        )
        self.fair.observe_live(elapsed.tolist(), ideal.tolist())

    def _live_pass_due(self, now: float) -> bool:
        """Whether a completion at ``now`` runs ``_observe_live_slowdowns``' pass."""
        return now - self._live_pass_s >= LIVE_SLOWDOWN_EVERY_S

    def _session_abort(self, s: int, ev: SessionEvent, now: float) -> None:
        self._finish(s, False, now)

    def _finish(self, s: int, finished: bool, now: float, reason: str = "") -> None:
        ss = self.state.sessions
        node = int(ss.node_v[s])
        if node != NO_SLOT:
            graph = self.graphs.graphs[int(ss.agent_v[s])]
            graph.observe_transition(node, FINISH_NODE, now)
            if ss.wait_started_s_v[s] >= 0.0:
                graph.observe_outcome(node, False, now)
        t = int(ss.tenant_v[s])
        if finished:
            self._observe_live_slowdowns(now)
            self.fair.record_completion(t, now - float(ss.started_s_v[s]), float(ss.ideal_s_v[s]))
        if ss.home_v[s] != NO_SLOT and ss.tier_v[s] != TIER_NONE:
            self.state.release(s)
            reason = reason or ("session_finish" if finished else "session_abort")
            self._emit(s, Action.RELEASE, 0.0, 0.0, reason)
        self.state.remove_session(s)

    def _new_session(self, sid: SessionId, tenant_id: TenantId, agent_type: str, now: float) -> int:
        ss = self.state.sessions
        s = self.state.add_session(sid, self.fair.slot(tenant_id))
        if agent_type not in self.agents.index and len(self.agents.names) >= MAX_AGENT_TYPES:
            agent_type = OTHER_AGENT_TYPE  # bounded graphs whatever clients send
        a = self.agents.get(agent_type)
        self.graphs.for_agent(a, agent_type, now)
        ss.agent_v[s] = a
        ss.started_s_v[s] = now
        self.fair.session_started(now)
        ss.last_event_s_v[s] = now
        ss.wait_started_s_v[s] = -1.0
        return s

    def _move_home(self, s: int, w: int) -> None:
        ss = self.state.sessions
        if ss.home_v[s] != NO_SLOT and ss.tier_v[s] != TIER_NONE:
            # the session runs elsewhere now: the old copy only wastes memory
            self.state.release(s)
            self._emit(s, Action.RELEASE, 0.0, 0.0, "moved")
        ss.lease_expires_s_v[s] = 0.0
        ss.timer_due_s_v[s] = NO_TIMER
        self.state.link(s, w)

    # -- timers ------------------------------------------------------------------

    def tick(self, now: float) -> Decisions:
        """Expire leases, start due prefetches, re-price leases where pressure rose,
        bring tenants over their GPU quota back under it."""
        ss = self.state.sessions
        self.graphs.rescale_due(now)
        due = ss.timer_due_s[: ss.high_water]
        fire = np.flatnonzero(due <= now)
        if fire.size:
            # earliest first, slot breaking ties: the same order on every replay
            order = fire[np.lexsort((fire, due[fire]))]
            batch = self._batch
            if not (
                len(order) >= batch.min_batch and batch.usable() and batch.fire_timers(order, now)
            ):
                for s in order.tolist():
                    kind = int(ss.timer_kind_v[s])
                    ss.timer_due_s_v[s] = NO_TIMER
                    self.retention.on_timer(s, kind, now)
        self.retention.redecide_pricier_workers(now)
        self.retention.enforce_quotas(now)
        self._expire_silent_sessions(now)
        return self._flush()

    def _expire_silent_sessions(self, now: float) -> None:
        # NOTE: a client that dies mid-task never sends SESSION_ABORT; without
        # this its session (and any KV it holds) would stay forever.
        #
        # The scan reads every session; it runs only once the oldest last event
        # it could expire is ``ttl`` old. A running session it leaves alone
        # leaves the bound: only an event can end its step, and that event
        # becomes its last (handle_batch lowers the bound for events older
        # than it, should time go back).
        ttl = self.config.session_idle_ttl_s
        ss = self.state.sessions
        if ttl <= 0 or not len(ss) or now - ttl < self._quiet_since_s:
            return
        hw = ss.high_water
        last = ss.last_event_s[:hw]
        silent = (last < now - ttl) & (ss.tenant[:hw] != NO_SLOT)
        running = ss.state[:hw] == STATE_RUNNING
        for s in np.flatnonzero(silent & ~running).tolist():
            self._finish(s, False, now, "session_expired")
        watched = (ss.tenant[:hw] != NO_SLOT) & ~(silent & running)
        self._quiet_since_s = float(last[watched].min()) if watched.any() else math.inf

    def _set_timer(self, s: int, due: float, kind: int) -> None:
        ss = self.state.sessions
        ss.timer_due_s_v[s] = due
        ss.timer_kind_v[s] = kind

    # -- directives ----------------------------------------------------------------

    def _emit(self, s: int, action: Action, ttl_s: float, within_s: float, reason: str) -> None:
        """Record one directive to session ``s``'s home."""
        ss = self.state.sessions
        self._directive_seq += 1
        epoch = self.leader_epoch
        did: DirectiveId = f"d{epoch}-{self._directive_seq}"  # type: ignore[assignment]
        sid: SessionId = ss.ids[s]  # type: ignore[assignment]
        self._out.append(
            RetentionDirective(
                did,
                self.state.workers.ids[ss.home_v[s]],
                sid,
                action,
                ttl_s,
                self.fair.directive_priority(ss.tenant_v[s]),
                epoch,
                within_s,
                reason,
            )
        )
        self.directives_total += 1
        self._unacked.add(epoch, self._directive_seq, [sid], [action])

    def _emit_columns(
        self,
        slots: list[int],
        actions: Sequence[Action],
        ttls: Sequence[float],
        withins: Sequence[float],
        reasons: Sequence[str],
        priorities: Sequence[int],
        homes: list[int],
    ) -> None:
        """Record one directive per row, in order: what ``_emit`` does row by row,
        built column by column (``priorities`` and ``homes``: each row's directive
        priority and worker slot, as they were when it was decided)."""
        n = len(slots)
        ss = self.state.sessions
        epoch = self.leader_epoch
        seq = self._directive_seq
        prefix = f"d{epoch}-"
        dids: list[DirectiveId] = [f"{prefix}{i}" for i in range(seq + 1, seq + n + 1)]  # type: ignore[misc]
        self._directive_seq = seq + n
        sids: list[SessionId] = list(map(ss.ids.__getitem__, slots))  # type: ignore[arg-type]
        wids = self.state.workers.ids
        # NOTE: the tuples are built by C loops (map/zip), not one call per row:
        # a row costs ~0.5 µs this way, ~2.5 µs through RetentionDirective(...)
        self._out.extend(
            map(
                tuple.__new__,
                repeat(RetentionDirective),
                zip(
                    dids,
                    list(map(wids.__getitem__, homes)),
                    sids,
                    actions,
                    ttls,
                    priorities,
                    repeat(epoch),
                    withins,
                    reasons,
                ),
            )
        )
        self.directives_total += n
        self._unacked.add(epoch, seq + 1, sids, actions)

    def _flush(self) -> Decisions:
        # the end of a batch or tick: slots its ended sessions freed are reusable
        self.state.sessions.reuse_freed()
        if not self._out:
            return NO_DECISIONS
        out = Decisions(directives=tuple(self._out))
        self._out.clear()
        return out

    # -- placement ---------------------------------------------------------------

    def place(self, req: PlaceRequest, now: float) -> Placement:
        """Rank workers for a session's next step; empty when none is live.

        Raises TenantLimitExceeded for a session the engine does not know yet
        when its tenant already has max_concurrent_sessions live sessions.
        """
        if req.session_id not in self.state.sessions.slot_of:
            t = self.fair.tenants.index.get(req.tenant_id)
            if t is not None and self.quotas.at_session_limit(t):
                raise TenantLimitExceeded(
                    req.tenant_id,
                    "max_concurrent_sessions",
                    self.quotas.session_limit(t),
                    self.state.tenant_sessions[t],
                )
        self.placements_total += 1
        return self.placer.place(req, now)

    # -- tenants -------------------------------------------------------------------

    def create_tenant(self, spec: TenantSpec) -> TenantSpec:
        """Add a tenant; raises FileExistsError when it exists."""
        if spec.tenant_id in self._tenants:
            raise FileExistsError(spec.tenant_id)
        self._tenants[spec.tenant_id] = spec
        self.fair.set_weight(spec.tenant_id, spec.weight)
        self.quotas.set(self.fair.slot(spec.tenant_id), spec)
        return spec

    def update_tenant(self, spec: TenantSpec, fields: Iterable[str] | None = None) -> TenantSpec:
        """Update a tenant's fields (all mutable fields when ``fields`` is None)."""
        cur = self._tenants.get(spec.tenant_id)
        if cur is None:
            raise KeyError(spec.tenant_id)
        new = spec if fields is None else replace(cur, **{f: getattr(spec, f) for f in fields})
        self._tenants[spec.tenant_id] = new
        self.fair.set_weight(new.tenant_id, new.weight)
        self.quotas.set(self.fair.slot(new.tenant_id), new)
        return new

    def get_tenant(self, tenant_id: TenantId) -> TenantSpec | None:
        """The tenant, or None."""
        return self._tenants.get(tenant_id)

    def list_tenants(self) -> list[TenantSpec]:
        """All tenants ordered by id."""
        return [self._tenants[t] for t in sorted(self._tenants)]

    def delete_tenant(self, tenant_id: TenantId) -> bool:
        """Remove a tenant (and its limits); True when it existed."""
        if self._tenants.pop(tenant_id, None) is None:
            return False
        t = self.fair.tenants.index.get(tenant_id)
        if t is not None:
            self.quotas.set(t, None)
        return True

    # -- read side -------------------------------------------------------------

    def session_view(self, session_id: SessionId, now: float) -> SessionView | None:
        """A session as operators see it, or None when unknown."""
        s = self.state.sessions.slot_of.get(session_id)
        return None if s is None else session_view(self, s, now)

    def worker_views(self) -> list[WorkerView]:
        """Every known worker ordered by id."""
        ws = self.state.workers
        return [worker_view(self.state, ws.slot_of[w]) for w in sorted(ws.slot_of)]

    def stats(self, now: float) -> ClusterStatsView:
        """Cluster-wide figures."""
        return cluster_stats(self, now)


__all__ = ["Engine", "EngineConfig"]
