"""The engine's compiled path: batches and timers applied by ``kernels.events``.

``Engine.handle_batch`` hands a validated batch here, and ``Engine.tick`` its
due timers, when the engine runs on the numba kernels and no tenant has a KV
quota. A batch becomes
columns (session slot, kind, tokens, worker slot, graph node, hint) in one
pass, and the sessions it starts are made (``BatchPath._make_sessions``);
``apply_events`` applies events in order until one needs the Python path
(see the kernel module), the engine applies that one event, and the kernel
goes on from the next. The directives a kernel records are emitted through
``Engine._emit_columns``, and the sessions it ended are recorded and removed,
before the Python path runs, so directive ids and order are exactly those of
the per-event path, which is this path's reference twin
(tests/engine/test_batch_path.py runs both on the same traffic).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from numba import typed

from scheduler_service import kernels as kernel_sets
from scheduler_service.domain import Action, EventKind, SessionEvent
from scheduler_service.engine_checks import check_columns
from scheduler_service.engine_config import DECODE_FLOOR_DRIFT, EngineConfig
from scheduler_service.graph.agent_graph import AgentGraph
from scheduler_service.graph.sketch import DURATION_BUCKETS, TOKEN_BUCKETS
from scheduler_service.kernels import events as kev
from scheduler_service.kernels.checks import columns_valid
from scheduler_service.state import ClusterState, SessionTable, WorkerTable

if TYPE_CHECKING:
    from scheduler_service.engine import Engine

_FIELDS = attrgetter(
    "session_id", "tenant_id", "kind", "context_tokens", "new_tokens", "step_index",
    "worker_id", "expected_tool_latency_s", "last_step", "tool_name",
)  # fmt: skip
_WAIT = EventKind.TOOL_CALL_WAIT
_VERSION = attrgetter("version")
_WAIT_KIND = int(_WAIT)
_FINISH_KIND = int(EventKind.SESSION_FINISH)
_ABORT_KIND = int(EventKind.SESSION_ABORT)
#: Action and reason code → object, for fancy indexing by a kernel's code column
_ACTIONS = np.array([None, *(Action(a) for a in range(1, max(Action) + 1))], dtype=object)
_REASONS = np.array(kev.REASONS, dtype=object)
#: the kernels, typed loosely (numba's Dispatcher stubs take no argument list)
apply_events: Any = kev.apply_events
fire_timers: Any = kev.fire_timers
#: Batches (and ticks with fewer due timers) shorter than this take the
#: per-event path: the kernel's fixed cost per call (columns, arguments,
#: dispatch: ~30 µs) outweighs what it saves.
MIN_KERNEL_BATCH = 4
_BUCKETS = (DURATION_BUCKETS.upper_edges, DURATION_BUCKETS.mids, DURATION_BUCKETS._unit_spreads)
_warmed = False


class BatchPath:
    """Columns, kernel calls and the hand-over to the Python path for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._graph_sig: tuple[int, int, int] = (-1, 0, 0)
        self._graph_args: tuple[Any, ...] = ()
        # (agent slot, tool name) -> the node of a wait on it. NOTE: a graph
        # never renumbers or drops a node, so what was found stays right for as
        # long as the engine keeps that graph
        self._nodes: dict[tuple[int, str], int] = {}
        self._params_of: tuple[Any, ...] = ()  # the knobs self._params_array was made of
        self._params_array = np.empty(0)
        self._declared: npt.NDArray[np.bool_] | None = None
        # directive buffers, kept between calls and grown when a kernel says so
        self._out = _outputs(256)
        self._ends = np.empty((256, 3), dtype=np.int64)  # ``X``, at least a batch long
        #: shorter batches take the per-event path (tests lower it to 1)
        self.min_batch = MIN_KERNEL_BATCH

    def workers_changed(self) -> None:
        """A worker registered: its declared decode rate may be new."""
        self._declared = None

    def usable(self) -> bool:
        """True when the kernels may apply this engine's events (numba, no quotas)."""
        e = self.engine
        q = e.quotas
        return (
            e.config.batch_path
            and e.kernels is kernel_sets.NUMBA
            and not any(q.gpu_bytes)
            and not any(q.host_bytes)
        )

    def columns(self, events: Sequence[SessionEvent], check: bool) -> tuple[npt.NDArray[Any], ...]:
        """The batch as the kernel's columns (see ``kev._apply_events``); with
        ``check``, validated first as ``Engine.check_events`` would (Rejected).

        # NOTE: C loops (attrgetter, map, fromiter) and few numpy calls: at ~64
        # events a batch, a numpy call's fixed ~1 µs is as much as its work.
        """
        e = self.engine
        n = len(events)
        sids, tids, kinds, ctx, new, step, wids, hints, last, tools = zip(
            *map(_FIELDS, events), strict=True
        )
        slots = list(map(e.state.sessions.slot_of.get, sids, repeat(-1)))
        workers = list(map(e.state.workers.slot_of.get, wids, repeat(kev.NO_WORKER)))
        cols = (
            np.fromiter(slots, np.int64, n),
            np.fromiter(kinds, np.int64, n),
            np.fromiter(ctx, np.int64, n),
            np.fromiter(new, np.int64, n),
            np.fromiter(step, np.int64, n),
            np.fromiter(hints, np.float64, n),
        )
        if check:
            t = e.fair.tenants
            check_columns(e.state, t.names, t.index, events, (sids, tids, wids), cols, workers)
        nodes = [-1] * n
        if _WAIT in kinds:
            for i, kind in enumerate(kinds):
                if kind is _WAIT:
                    nodes[i] = self._node(tools[i], slots[i])
        slot_col, kind_col, ctx_col, new_col, step_col, hint_col = cols
        return (
            slot_col,
            kind_col,
            ctx_col,
            new_col,
            step_col,
            np.fromiter(workers, np.int64, n),
            np.fromiter(nodes, np.int64, n),
            hint_col,
            np.fromiter(last, np.bool_, n),
        )

    def run(
        self, events: Sequence[SessionEvent], cols: tuple[npt.NDArray[Any], ...], now: float
    ) -> None:
        """Apply a validated batch (``usable``, at least ``min_batch`` events, in
        ``columns``): kernel runs, Python for the events it hands back."""
        e = self.engine
        n = len(events)
        ss = e.state.sessions
        e_slot, e_node = cols[0], cols[6]
        graphs = self._graphs()
        if graphs is not None:
            self._make_sessions(events, cols, now)
        params = self._params()
        if len(self._ends) < n:
            self._ends = np.empty((2 * n, 3), dtype=np.int64)
        index: _BatchIndex | None = None  # built at the first hand-over
        sessions = session_arrays(ss)  # until a new session grows the table
        i = 0
        while i < n:
            if graphs is None:
                j = i  # no graph yet: this event (a new session) goes to Python
            else:
                if ss.tenant is not sessions[0]:
                    sessions = session_arrays(ss)
                counters = self._counters()
                params[kev.P_LIVE_DUE] = e._live_pass_due(now)
                j, k, m, why = apply_events(
                    i, float(now), params, e.fair.protection, *cols, *sessions,
                    *self._worker_arrays(), *graphs, *_BUCKETS, *counters, *self._out,
                    self._ends,
                )  # fmt: skip
                self._settle(counters, k, m, now)
                if why != kev.STOP:
                    if why == kev.FULL:
                        # NOTE: an event emits one directive plus one per eviction
                        # its relief orders (at most its worker's residents); the
                        # kernel stopped before event j rather than overflow
                        ws = e.state.workers
                        most = int(ws.residents[: ws.high_water].max())
                        self._out = _outputs(2 * (len(self._out[0]) + most))
                    i = j
                    continue
            if j >= n:
                break
            # the kernel handed back event j: the Python path applies it
            ev = events[j]
            e._apply_events((ev,), now)
            graphs = self._graphs()  # it may have made a graph or a node
            # it may have created or ended its session, or (a tool wait) made a
            # graph node: re-resolve the later events that depend on either
            if index is None:
                index = _BatchIndex(events)
            s = ss.slot_of.get(ev.session_id, -1)
            for x in index.later(index.by_session, ev.session_id, j):
                e_slot[x] = s
                kind = events[x].kind
                if kind is _WAIT:
                    e_node[x] = self._node(events[x].tool_name, s)
                elif kind >= _FINISH_KIND:
                    s = -1  # it ends there: the Python path starts it anew after
            if ev.kind is _WAIT:
                for x in index.later(index.waits_by_tool, ev.tool_name, j):
                    if e_node[x] < 0:
                        e_node[x] = self._node(events[x].tool_name, int(e_slot[x]))
            i = j + 1

    def fire_timers(self, order: npt.NDArray[np.intp], now: float) -> bool:
        """Fire the timers of sessions ``order`` as ``Engine.tick`` would; False (and
        nothing done) while there is no graph."""
        graphs = self._graphs()
        if graphs is None:
            return False
        e = self.engine
        if len(self._out[0]) < len(order):  # a timer emits one directive at most
            self._out = _outputs(2 * len(order))
        counters = self._counters()
        k = fire_timers(
            order, float(now), self._params(), e.fair.protection,
            *session_arrays(e.state.sessions), *self._worker_arrays(), *graphs, *_BUCKETS,
            *counters, *self._out,
        )  # fmt: skip
        self._settle(counters, k, 0, now)
        return True

    def _make_sessions(
        self, events: Sequence[SessionEvent], cols: tuple[npt.NDArray[Any], ...], now: float
    ) -> None:
        """Make the sessions the batch starts, in order, before the kernel runs, and
        point events of a session the batch has ended at the Python path.

        # NOTE: exact because a slot freed in a batch is reused only after it
        # (ClusterState.remove_session), so these get the slots the per-event
        # path would, and because a session made early is invisible to the
        # events before it: nothing links it to a worker before its first event,
        # and fair share's live pass counts it as zero. Making stops at the
        # first new session the Python path must make itself (an unknown tenant
        # or agent type, a session started anew after it ended in this batch,
        # an abort of a session never seen): sessions are made in batch order.
        """
        e_slot, e_kind, e_node = cols[0], cols[1], cols[6]
        slots = e_slot.tolist()
        kinds = e_kind.tolist()
        if -1 not in slots and max(kinds) < _FINISH_KIND:
            return
        e = self.engine
        tenants = e.fair.tenants.index
        agents = e.agents.index
        made: dict[str, int] = {}
        ended: set[int] = set()
        making = True
        for i, (s, kind) in enumerate(zip(slots, kinds, strict=True)):
            if s < 0:
                ev = events[i]
                s = made.get(ev.session_id, -1)
                if s < 0:
                    if not (
                        making
                        and kind != _ABORT_KIND
                        and ev.tenant_id in tenants
                        and ev.agent_type in agents
                    ):
                        making = False
                        continue
                    s = e._new_session(ev.session_id, ev.tenant_id, ev.agent_type, now)
                    made[ev.session_id] = s
                if s not in ended:
                    e_slot[i] = s
                    if kind == _WAIT_KIND:
                        e_node[i] = self._node(ev.tool_name, s)
            if s in ended:
                # it ended earlier in this batch: the Python path starts it anew
                e_slot[i] = -1
                making = False
            elif kind >= _FINISH_KIND:
                ended.add(s)

    # -- columns and arguments ---------------------------------------------------

    def _params(self) -> npt.NDArray[np.float64]:
        """``batch_params`` of the engine's config, remade only when a knob changed
        (the array is the kernels': ``run`` sets ``P_LIVE_DUE`` in it per call)."""
        c = self.engine.config
        knobs = (
            c.knee_tokens, c.min_lease_ttl_s, c.max_lease_ttl_s, c.idle_utilization,
            c.max_shadow_price, c.demand_weight, c.demand_horizon_s, c.transfer_weight,
            c.prefetch_margin, c.low_watermark, c.high_watermark, c.graph_prior,
        )  # fmt: skip
        if knobs != self._params_of:
            self._params_of = knobs
            self._params_array = batch_params(c)
        return self._params_array

    def _node(self, tool_name: str, s: int) -> int:
        """The graph node of session ``s``'s wait on ``tool_name``, or -1 when the
        session or the node does not exist yet."""
        if s < 0:
            return -1
        e = self.engine
        a = int(e.state.sessions.agent_v[s])
        i = self._nodes.get((a, tool_name))
        if i is None:
            graph = e.graphs.graphs[a]
            key = (_WAIT_KIND, tool_name)
            i = graph.lookup(key)
            if i is None:
                return -1
            if key in graph.index:  # its own node (not the shared one of a full graph):
                self._nodes[a, tool_name] = i  # bounded by the graphs' nodes
        return i

    def _worker_arrays(self) -> tuple[npt.NDArray[Any], ...]:
        ws = self.engine.state.workers
        if self._declared is None or self._declared.shape[0] != ws.capacity:
            declared = np.zeros(ws.capacity, dtype=np.bool_)
            for w, spec in enumerate(ws.specs):
                declared[w] = bool(spec is not None and spec.cache.decode_tokens_per_s)
            self._declared = declared
        return worker_arrays(ws, self._declared)

    def _graphs(self) -> tuple[Any, ...] | None:
        """The graphs' arrays by agent slot, or None while there is no graph.

        # NOTE: no graph is due to rescale here: Engine.handle_batch and
        # Engine.tick rescale due graphs (GraphStore.rescale_due) before this.
        """
        graphs = self.engine.graphs.graphs
        # NOTE: a store only ever adds graphs, and a graph's version only grows
        # (a rescale or a new row of nodes), so the sum moves at every change
        sig = (id(graphs), len(graphs), sum(map(_VERSION, graphs.values())))
        if sig != self._graph_sig:
            self._graph_sig = sig
            self._nodes.clear()
            dense = bool(graphs) and sorted(graphs) == list(range(len(graphs)))
            self._graph_args = (
                graph_arrays([graphs[a] for a in range(len(graphs))]) if dense else ()
            )
        return self._graph_args or None

    def _counters(self) -> npt.NDArray[np.int64]:
        # per-tenant deltas (``T``): events, GPU bytes, host bytes, one row each
        e = self.engine
        n = max(len(e.fair.events), len(e.state.tenant_gpu_bytes), len(e.state.tenant_host_bytes))
        return np.zeros((3, n), dtype=np.int64)

    def _settle(self, counters: npt.NDArray[np.int64], k: int, m: int, now: float) -> None:
        """Fold the kernel's per-tenant deltas into the lists, emit its ``k``
        directives and finish its ``m`` ended sessions (Engine._finish's rest)."""
        e = self.engine
        for target, delta in zip(
            (e.fair.events, e.state.tenant_gpu_bytes, e.state.tenant_host_bytes),
            counters.tolist(),
            strict=True,
        ):
            for t, d in enumerate(delta):
                if d:
                    target[t] += d
        ends = self._ends[:m].tolist()
        ss = e.state.sessions
        # a completion is recorded between the directives before and after it:
        # each carries its tenant's priority as it was when it was made
        priority = e.fair.priority
        tenants = self._out[6][:k].tolist()
        prio: list[int] = []
        at = 0
        for s, before, finished in ends:
            if finished:
                prio += map(priority.__getitem__, tenants[at:before])
                at = before
                e.fair.record_completion(
                    int(ss.tenant_v[s]), now - float(ss.started_s_v[s]), float(ss.ideal_s_v[s])
                )
        prio += map(priority.__getitem__, tenants[at:k])
        self._emit(k, prio)
        for s, _before, _finished in ends:
            e.state.remove_session(s)

    def _emit(self, k: int, priorities: list[int]) -> None:
        # the k recorded directives, through Engine._emit_columns
        if not k:
            return
        slots, actions, ttls, withins, reasons, homes, _tenants = self._out
        self.engine._emit_columns(
            slots[:k].tolist(),
            _ACTIONS[actions[:k]].tolist(),
            ttls[:k].tolist(),
            withins[:k].tolist(),
            _REASONS[reasons[:k]].tolist(),
            priorities,
            homes[:k].tolist(),
        )


class _BatchIndex:
    """Positions in a batch by session and, for tool waits, by tool name."""

    def __init__(self, events: Sequence[SessionEvent]) -> None:
        self.by_session: dict[str, list[int]] = {}
        self.waits_by_tool: dict[str, list[int]] = {}
        for x, ev in enumerate(events):
            self.by_session.setdefault(ev.session_id, []).append(x)
            if ev.kind is _WAIT:
                self.waits_by_tool.setdefault(ev.tool_name, []).append(x)

    @staticmethod
    def later(positions: dict[str, list[int]], key: str, j: int) -> list[int]:
        """The positions under ``key`` after ``j``."""
        xs = positions.get(key, [])
        return xs[bisect.bisect_right(xs, j) :]


def batch_params(c: EngineConfig) -> npt.NDArray[np.float64]:
    """The engine's knobs in the order the kernels read them (``kev.P_*``)."""
    p = c.graph_prior
    out = [0.0] * kev.N_PARAMS  # NOTE: a list, then one array: ~2x faster than numpy writes
    out[kev.P_KNEE] = c.knee_tokens
    out[kev.P_MIN_TTL] = c.min_lease_ttl_s
    out[kev.P_MAX_TTL] = c.max_lease_ttl_s
    out[kev.P_IDLE_UTIL] = c.idle_utilization
    out[kev.P_MAX_PRICE] = c.max_shadow_price
    out[kev.P_DEMAND_W] = c.demand_weight
    out[kev.P_DEMAND_H] = c.demand_horizon_s
    out[kev.P_TRANSFER_W] = c.transfer_weight
    out[kev.P_PREFETCH_MARGIN] = c.prefetch_margin
    out[kev.P_LOW_WM] = c.low_watermark
    out[kev.P_HIGH_WM] = c.high_watermark
    out[kev.P_HINT_W] = p.hint_weight
    out[kev.P_EARLY_Q] = p.early_quantile
    out[kev.P_P_FINISH] = p.p_finish
    out[kev.P_DUR_LO] = DURATION_BUCKETS.lo
    out[kev.P_DUR_LOG_RATIO] = DURATION_BUCKETS._log_ratio
    out[kev.P_TOK_LO] = TOKEN_BUCKETS.lo
    out[kev.P_TOK_LOG_RATIO] = TOKEN_BUCKETS._log_ratio
    out[kev.P_DECODE_DRIFT] = DECODE_FLOOR_DRIFT
    out[kev.P_TOK_N] = TOKEN_BUCKETS.n
    return np.array(out, dtype=np.float64)


def session_arrays(ss: SessionTable) -> tuple[npt.NDArray[Any], ...]:
    """The session arrays in the kernels' order (``S``)."""
    return (
        ss.tenant, ss.agent, ss.home, ss.tier, ss.state, ss.gpu_blocks, ss.host_blocks,
        ss.context_tokens, ss.wait_context_tokens, ss.step_index, ss.events, ss.node,
        ss.timer_due_s, ss.timer_kind, ss.last_event_s, ss.wait_started_s, ss.next_use_s,
        ss.lease_expires_s, ss.prefetch_at_s, ss.p_continue, ss.hint_s, ss.price_at_grant,
        ss.ideal_s, ss.step_started_s, ss.next, ss.prev,
    )  # fmt: skip


def worker_arrays(
    ws: WorkerTable, decode_declared: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[Any], ...]:
    """The worker arrays in the kernels' order (``W``)."""
    return (
        ws.gpu_cap_blocks, ws.host_cap_blocks, ws.gpu_used_blocks, ws.host_used_blocks,
        ws.pending_free_blocks, ws.queued_prefill_tokens, ws.prefill_tokens_per_s,
        ws.host_link_bytes_per_s, ws.block_size_tokens, ws.bytes_per_token, ws.block_bytes,
        ws.kv_feed, ws.head, ws.price_at_decision, ws.decode_s_per_token,
        ws.decode_s_per_context_token, decode_declared, ws.residents,
    )  # fmt: skip


def graph_arrays(graphs: list[AgentGraph]) -> tuple[Any, ...]:
    """Reference times, time constants and two typed lists of the graphs' arrays (``G``):
    agent ``a``'s duration, tokens and transitions at 3a..3a+2 of the first, its
    tokens sum and weight, continued and finished at 4a..4a+3 of the second."""
    return (
        np.array([g._t_ref for g in graphs], dtype=np.float64),
        np.array([g._tau_s for g in graphs], dtype=np.float64),
        typed.List([x for g in graphs for x in (g.duration, g.tokens, g.trans)]),
        typed.List(
            [x for g in graphs for x in (g.tokens_sum, g.tokens_weight, g.continued, g.finished)]
        ),
    )


def _outputs(n: int) -> tuple[npt.NDArray[Any], ...]:
    # directive slot, action, TTL, complete-within, reason code, home, tenant (``D``)
    return (
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.float64),
        np.empty(n, dtype=np.float64),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
    )


def warm() -> None:
    """Compile (or load from the cache) the kernels for the types the engine passes."""
    global _warmed
    if _warmed:
        return
    state = ClusterState()
    i64 = np.zeros(0, dtype=np.int64)
    cols = (i64, i64, i64, i64, i64, i64, i64, np.zeros(0), np.zeros(0, dtype=np.bool_))
    params = batch_params(EngineConfig())
    args = (
        *session_arrays(state.sessions),
        *worker_arrays(state.workers, np.zeros(state.workers.capacity, dtype=np.bool_)),
        *graph_arrays([AgentGraph("warm")]),
        *_BUCKETS,
        i64,
        i64,
        i64,
        *_outputs(0),
    )
    apply_events(0, 0.0, params, np.ones(1), *cols, *args, np.zeros((0, 3), dtype=np.int64))
    columns_valid(
        i64, i64, i64, i64, np.zeros(0), i64, np.zeros(0, dtype=np.bool_), state.sessions.tenant
    )
    fire_timers(np.zeros(0, dtype=np.intp), 0.0, params, np.ones(1), *args)
    _warmed = True
