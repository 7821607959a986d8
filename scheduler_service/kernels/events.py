"""Kernels: apply a run of session events, or the timers due, in one compiled pass.

The engine's per-event Python (``Engine.handle_batch`` and the handlers it
calls, ``Engine.tick``'s timer loop and ``Retention.on_timer``) is these
kernels' reference twin: for everything they apply, they make exactly the
changes the Python path makes, float for float, in the same order, and record
the directives the Python path would emit (its eviction under pressure, its
prefetches and its lease expiries included). They run only while no tenant
has a KV quota (the engine checks) and, as the engine rescales due graphs at
the start of every batch and tick, no graph ever rescales its weights inside.

``apply_events`` covers STEP_START, TOOL_CALL_WAIT, TOOL_CALL_END,
SESSION_FINISH and SESSION_ABORT of a session that exists (the engine makes a
batch's new sessions before the kernel runs), on its home worker or moving to
one while it holds no KV. Anything else stops the run *before* that event
changes anything and the kernel returns its index: a session not made yet, a
move that drops KV, STEP_END, a tool node the graph has not seen, a wait
whose size is unknown, a finish when fair share's pass over live sessions is
due. The engine applies that event in Python and calls the kernel again for
the rest of the batch.

A session that ends is released and taken off its home's list here; the
engine records its completion with fair share and frees its slot when it
turns the kernel's output into directives (``X`` lists the ends, each with
the number of directives recorded before it, so a completion is recorded
between the directives before and after it, as in the per-event path). As
fair share's eviction protection may change at a completion, the kernel
returns (``RESUME``) before a step that may run relief after one in the same
call; the engine records the completion and calls it again from that step.

Inside, state travels in tuples of arrays, in the orders ``engine_batch``
builds: ``S`` sessions, ``W`` workers, ``G`` graphs (reference times, time
constants, a typed list of each agent's 2-D arrays and one of its 1-D arrays),
``B`` duration buckets, ``T`` per-tenant deltas (events, GPU bytes, host
bytes), ``D`` the directives recorded (slot, action, TTL, complete-within,
reason code, home worker, tenant), ``X`` the sessions ended (rows of slot, directives before it,
whether it finished). The entry points take them flat: numba types a tuple argument
in Python at every call (~90 µs for these), an array in C.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from scheduler_service.kernels.costs import prefill_s
from scheduler_service.kernels.eviction import rank_victims
from scheduler_service.kernels.pressure import shadow_price
from scheduler_service.kernels.retention import OFFLOAD_HOST, RETAIN_GPU, retention_choice
from scheduler_service.kernels.sketch import remaining_time

# event kinds (EventKind), tiers (Tier), states (SessionState), timers, actions
K_STEP_START = 1
K_TOOL_CALL_WAIT = 2
K_TOOL_CALL_END = 3
K_STEP_END = 4
K_SESSION_FINISH = 5
K_SESSION_ABORT = 6
TIER_NONE = 0
TIER_GPU = 1
TIER_HOST = 2
STATE_RUNNING = 1
STATE_TOOL_WAIT = 2
NO_SLOT = -1
NO_TIMER = math.inf
TIMER_LEASE = 1
TIMER_PREFETCH = 2
PREFETCHED = -1.0
A_RETAIN_GPU = 1
A_OFFLOAD_HOST = 2
A_PREFETCH_GPU = 3
A_RELEASE = 4
A_EVICT_NOW = 5
#: event_worker value for an event that names no worker
NO_WORKER = -2
#: reason codes of the directives the kernels emit (``REASONS`` names them)
R_TOOL_WAIT = 0
R_TOOL_RETURNED = 1
R_PRESSURE = 2
R_LEASE_EXPIRED = 3
R_PREFETCH = 4
R_SESSION_FINISH = 5
R_SESSION_ABORT = 6
REASONS = (
    "tool_wait", "tool_returned", "pressure", "lease_expired", "prefetch_before_return",
    "session_finish", "session_abort",
)  # fmt: skip
#: graph node a finished session transitions to (graph.agent_graph.FINISH_NODE)
FINISH_NODE = 0
#: why ``apply_events`` stopped before an event: the Python path applies it
#: (or the batch is done), the directive buffers may be too small for it, or
#: ends must be recorded before it
STOP = 0
FULL = 1
RESUME = 2

# positions in ``params`` (``engine_batch`` builds it)
P_KNEE = 0
P_MIN_TTL = 1
P_MAX_TTL = 2
P_IDLE_UTIL = 3
P_MAX_PRICE = 4
P_DEMAND_W = 5
P_DEMAND_H = 6
P_TRANSFER_W = 7
P_PREFETCH_MARGIN = 8
P_LOW_WM = 9
P_HINT_W = 10
P_EARLY_Q = 11
P_P_FINISH = 12
P_DUR_LO = 13
P_DUR_LOG_RATIO = 14
P_TOK_LO = 15
P_TOK_LOG_RATIO = 16
P_DECODE_DRIFT = 17
P_TOK_N = 18
P_HIGH_WM = 19
P_LIVE_DUE = 20  # 1.0: fair share's pass over live sessions is due at a completion
N_PARAMS = 21


@njit(cache=True, inline="always")
def _bucket(value: float, lo: float, log_ratio: float, n: int) -> int:
    # LogBuckets.index
    if value < lo:
        return 0
    i = int(math.log(value / lo) / log_ratio) + 1
    return i if i < n else n - 1


@njit(cache=True, inline="always")
def _weight(G, a, now):  # type: ignore[no-untyped-def]
    # AgentGraph._weight (no rescale is due: the engine rescales before each call)
    return math.exp((now - G[0][a]) / G[1][a])


@njit(cache=True, inline="always")
def _predict(hist, c, f, upper, mids, units, params, scratch, waited, hint, last, gw):  # type: ignore[no-untyped-def]
    """Retention.predict over a node's duration sketch ``hist`` and its outcome
    weights ``c`` (continued) and ``f`` (finished); ``gw`` is the graph's weight
    now. Returns (mean remaining s, early remaining s, P(continue))."""
    if hint > 0.0:
        n = upper.shape[0]
        hb = _bucket(hint, params[P_DUR_LO], params[P_DUR_LOG_RATIO], n)
        hw = params[P_HINT_W] * gw
        for b in range(n):
            scratch[b] = hist[b] + units[hb, b] * hw
        hist = scratch
    exp_rem, early_rem, _mass = remaining_time(hist, upper, mids, waited, params[P_EARLY_Q])
    p_cont = c / (c + f) if c + f > 0 else 1.0 - params[P_P_FINISH]
    if last:
        p_cont = 0.0
    return exp_rem, early_rem, p_cont


@njit(cache=True, inline="always")
def _predict_session(s, now, waited, params, scratch, S, G, B):  # type: ignore[no-untyped-def]
    # Retention.predict for a waiting session (its node, hint and last-step mark)
    a = S[1][s]
    node = S[11][s]
    g_1d = G[3]
    return _predict(
        G[2][3 * a][node], g_1d[4 * a + 2][node], g_1d[4 * a + 3][node], B[0], B[1], B[2],
        params, scratch, waited, S[20][s], S[19][s] == 0.0, _weight(G, a, now),
    )  # fmt: skip


@njit(cache=True, inline="always")
def _charge(t_bytes: np.ndarray, t: int, w: int, delta_blocks: int, w_bb: np.ndarray) -> None:
    # ClusterState._charge_gpu / _charge_host
    if t >= 0 and w != NO_SLOT:
        t_bytes[t] += delta_blocks * w_bb[w]


@njit(cache=True, inline="always")
def _drop_host(s, R):  # type: ignore[no-untyped-def]
    # ClusterState._drop_host
    n = R[4][s]
    w = R[1][s]
    R[4][s] = 0
    if w != NO_SLOT and n:
        _charge(R[11], R[0][s], w, -n, R[9])
        left = R[6][w] - n
        R[6][w] = left if left > 0 else 0


@njit(cache=True, inline="always")
def _set_gpu_blocks(s, blocks, R):  # type: ignore[no-untyped-def]
    # ClusterState.set_gpu_blocks
    w = R[1][s]
    if R[2][s] == TIER_HOST:
        _drop_host(s, R)
    delta = blocks - R[3][s]
    R[3][s] = blocks
    R[2][s] = TIER_GPU
    if w != NO_SLOT and delta:
        _charge(R[10], R[0][s], w, delta, R[9])
        if not R[8][w]:
            R[5][w] += delta


@njit(cache=True, inline="always")
def _free_gpu(s, R):  # type: ignore[no-untyped-def]
    # ClusterState.free_gpu
    n = R[3][s]
    w = R[1][s]
    R[3][s] = 0
    if R[2][s] == TIER_GPU:
        R[2][s] = TIER_NONE
    if w != NO_SLOT and n:
        _charge(R[10], R[0][s], w, -n, R[9])
        left = R[5][w] - n
        R[5][w] = left if left > 0 else 0
        if R[8][w]:
            R[7][w] += n
    return n


@njit(cache=True, inline="always")
def _to_host(s, R):  # type: ignore[no-untyped-def]
    # ClusterState.to_host
    n = _free_gpu(s, R)
    w = R[1][s]
    _charge(R[11], R[0][s], w, n - R[4][s], R[9])
    R[4][s] = n
    R[2][s] = TIER_HOST
    if w != NO_SLOT:
        R[6][w] += n


@njit(cache=True, inline="always")
def _release(s, R):  # type: ignore[no-untyped-def]
    # ClusterState.release
    _free_gpu(s, R)
    _drop_host(s, R)
    R[2][s] = TIER_NONE


@njit(cache=True, inline="always")
def _charge_both(s, w, sign, S, W, T):  # type: ignore[no-untyped-def]
    # ClusterState._charge: add (1) or remove (-1) s's blocks as held on w
    t = S[0][s]
    if t < 0:
        return
    bb = sign * W[10][w]
    T[1][t] += S[5][s] * bb
    T[2][t] += S[6][s] * bb


@njit(cache=True, inline="always")
def _unlink(s, S, W, T):  # type: ignore[no-untyped-def]
    # ClusterState.unlink
    w = S[2][s]
    if w == NO_SLOT:
        return
    _charge_both(s, w, -1, S, W, T)
    p = S[25][s]
    nx = S[24][s]
    if p != NO_SLOT:
        S[24][p] = nx
    else:
        W[12][w] = nx
    if nx != NO_SLOT:
        S[25][nx] = p
    S[25][s] = NO_SLOT
    S[24][s] = NO_SLOT
    S[2][s] = NO_SLOT
    W[17][w] -= 1


@njit(cache=True, inline="always")
def _link(s, w, S, W, T):  # type: ignore[no-untyped-def]
    # ClusterState.link
    if S[2][s] == w:
        return
    if S[2][s] != NO_SLOT:
        _unlink(s, S, W, T)
    head = W[12][w]
    S[25][s] = NO_SLOT
    S[24][s] = head
    if head != NO_SLOT:
        S[25][head] = s
    W[12][w] = s
    W[17][w] += 1
    S[2][s] = w
    _charge_both(s, w, 1, S, W, T)


@njit(cache=True, inline="always")
def _transfer_s(blocks, w, L):  # type: ignore[no-untyped-def]
    # Retention.transfer_s over L = (block size, bytes per token, host link)
    nbytes = blocks * L[0][w] * L[1][w]
    return nbytes / L[2][w]


@njit(cache=True, inline="always")
def _residency(S, W, T):  # type: ignore[no-untyped-def]
    """The arrays ClusterState's block accounting touches (``R``), out of S, W, T.

    # NOTE: helpers take these few arrays, not S, W and T: numba passes every
    # array of a tuple argument field by field, and a call with all three
    # costs ~0.3 µs before it does anything.
    """
    return (S[0], S[2], S[3], S[5], S[6], W[2], W[3], W[4], W[11], W[10], T[1], T[2])


@njit(cache=True, inline="always")
def _plan_arrays(S, W):  # type: ignore[no-untyped-def]
    # the arrays _plan_prefetch touches (``P``)
    return (S[6], S[12], S[13], S[18], W[8], W[9], W[7])


@njit(cache=True, inline="always")
def _emit(D, k, s, action, ttl_s, within_s, reason, S):  # type: ignore[no-untyped-def]
    # the directive, to s's home as it is now (D[5]), of s's tenant (D[6])
    D[0][k] = s
    D[1][k] = action
    D[2][k] = ttl_s
    D[3][k] = within_s
    D[4][k] = reason
    D[5][k] = S[2][s]
    D[6][k] = S[0][s]
    return k + 1


@njit(cache=True, inline="always")
def _plan_prefetch(s, w, p_cont, early_rem, now, offload_s, params, P):  # type: ignore[no-untyped-def]
    # Retention.plan_prefetch; P = (host blocks, timer due, timer kind, prefetch at,
    # block size, bytes per token, host link)
    if p_cont <= 0.0:
        P[1][s] = NO_TIMER
        return
    reload_s = _transfer_s(P[0][s], w, P[4:])
    lead_s = reload_s * (1.0 + params[P_PREFETCH_MARGIN])
    at = now + max(offload_s, early_rem - lead_s)
    P[3][s] = at
    P[1][s] = at
    P[2][s] = TIMER_PREFETCH


@njit(cache=True)
def _evict(s, w, now, reason, otherwise, params, scratch, S, W, G, B, T, D, k):  # type: ignore[no-untyped-def]
    """Retention.evict (no quotas): to the host when that beats a rebuild, else drop."""
    R = _residency(S, W, T)
    L = (W[8], W[9], W[7])
    P = _plan_arrays(S, W)
    blocks = S[5][s]
    node = S[11][s]
    waiting = S[4][s] == STATE_TOOL_WAIT and node != NO_SLOT
    pc = S[19][s]
    early_rem = 0.0
    if waiting:
        waited = now - S[15][s]
        if waited < 0.0:
            waited = 0.0
        _exp, early_rem, pc = _predict_session(s, now, waited, params, scratch, S, G, B)
    move_s = _transfer_s(blocks, w, L)
    S[17][s] = 0.0
    S[12][s] = NO_TIMER
    rebuild_s = prefill_s(float(S[7][s]), W[6][w], params[P_KNEE])
    pays = params[P_TRANSFER_W] * 2.0 * move_s < pc * rebuild_s
    if W[1][w] - W[3][w] >= blocks > 0 and pays:
        _to_host(s, R)
        k = _emit(D, k, s, A_OFFLOAD_HOST, 0.0, move_s, reason, S)
        if waiting:
            _plan_prefetch(s, w, pc, early_rem, now, move_s, params, P)
    else:
        _release(s, R)
        k = _emit(D, k, s, otherwise, 0.0, 0.0, reason, S)
    return k


@njit(cache=True, inline="always")
def _blocks_short(cap, used, queued_tokens, block_tokens, params):  # type: ignore[no-untyped-def]
    """Retention.relieve's test: (whether a worker is short of free blocks, how
    many blocks relief frees to get back up)."""
    free = cap - used
    queued = -(-queued_tokens // block_tokens)
    low = params[P_LOW_WM] * cap
    if cap <= 0 or free >= (low if low >= queued else queued):
        return False, 0
    high = math.ceil(params[P_HIGH_WM] * cap)
    return True, (high if high >= queued else queued) - free


@njit(cache=True)
def _relieve(w, need, now, exclude, protection, params, scratch, S, W, G, B, T, D, k):  # type: ignore[no-untyped-def]
    """Retention.relieve on a worker ``_blocks_short`` found short: evict idle
    sessions of ``w`` to free ``need`` blocks."""
    # NOTE: np.int64: the warm-up's argument types (the head slot is int32 in W),
    # or this call would compile rank_victims a second signature
    victims = rank_victims(
        int(np.int64(W[12][w])), S[24], S[3], S[4], S[5], S[7], S[16], S[19], S[0], protection,
        now, W[6][w], params[P_KNEE], need, exclude,
    )  # fmt: skip
    for v in victims:
        k = _evict(v, w, now, R_PRESSURE, A_EVICT_NOW, params, scratch, S, W, G, B, T, D, k)
    return k


@njit(cache=True)
def _prefetch(s, now, reason, params, scratch, S, W, G, B, T, D, k):  # type: ignore[no-untyped-def]
    """Retention.prefetch (no quotas): reload a host-tier session, leased until its use."""
    R = _residency(S, W, T)
    L = (W[8], W[9], W[7])
    w = S[2][s]
    blocks = S[6][s]
    reload_s = _transfer_s(blocks, w, L)
    node = S[11][s]
    waiting = S[4][s] == STATE_TOOL_WAIT
    if waiting and node != NO_SLOT:
        waited = now - S[15][s]
        if waited < 0.0:
            waited = 0.0
        exp_rem, _early, _pc = _predict_session(s, now, waited, params, scratch, S, G, B)
        S[16][s] = now + exp_rem
    until_use_s = S[16][s] - now
    if until_use_s < 0.0:
        until_use_s = 0.0
    _set_gpu_blocks(s, blocks, R)
    S[18][s] = PREFETCHED
    ttl = max(params[P_MIN_TTL], 2.0 * until_use_s + reload_s)
    if waiting:
        S[17][s] = now + ttl
        S[12][s] = now + ttl
        S[13][s] = TIMER_LEASE
        within_s = reload_s * (1.0 + params[P_PREFETCH_MARGIN])
    else:
        S[17][s] = 0.0
        S[12][s] = NO_TIMER
        within_s = reload_s
    return _emit(D, k, s, A_PREFETCH_GPU, ttl, within_s, reason, S)


@njit(cache=True, inline="always")
def _touch(slots, S):  # type: ignore[no-untyped-def]
    """Read every field of sessions ``slots`` (-1: none) once; returns their sum.

    # NOTE: these loads do not depend on each other, so the CPU overlaps their
    # cache misses, and the loop that follows finds its sessions in cache: at
    # 10^5 sessions one session's fields are ~26 lines apart, each a miss.
    # The sum is stored by the caller, so the loads are not optimised away.
    """
    acc = 0.0
    for s in slots:
        if s >= 0:
            acc += (
                S[0][s] + S[1][s] + S[2][s] + S[3][s] + S[4][s] + S[5][s] + S[6][s] + S[7][s]
                + S[8][s] + S[9][s] + S[10][s] + S[11][s] + S[12][s] + S[13][s] + S[14][s]
                + S[15][s] + S[16][s] + S[17][s] + S[18][s] + S[19][s] + S[20][s] + S[21][s]
                + S[22][s] + S[23][s] + S[24][s] + S[25][s]
            )  # fmt: skip
    return acc


@njit(cache=True)
def _fire_timers(order, now, params, protection, S, W, G, B, T, D):  # type: ignore[no-untyped-def]
    """Engine.tick's timer loop: fire the timers of sessions ``order`` (in that order).

    Returns the number of directives written to ``D``.
    """
    scratch = np.empty(B[0].shape[0], dtype=np.float64)
    scratch[0] = _touch(order, S)
    k = 0
    for s in order:
        kind = S[13][s]
        S[12][s] = NO_TIMER
        # Retention.on_timer
        if kind == TIMER_LEASE and S[3][s] == TIER_GPU and S[17][s]:
            k = _evict(
                s, S[2][s], now, R_LEASE_EXPIRED, A_RELEASE, params, scratch, S, W, G, B, T, D, k
            )
        elif kind == TIMER_PREFETCH and S[3][s] == TIER_HOST:
            w = S[2][s]
            free_after = W[0][w] - W[2][w] - S[6][s]
            if free_after < params[P_HIGH_WM] * W[0][w]:
                continue  # reloading into a pool under pressure would only evict someone
            k = _prefetch(s, now, R_PREFETCH, params, scratch, S, W, G, B, T, D, k)
    return k


@njit(cache=True)
def _apply_events(start, now, params, E, protection, S, W, G, B, T, D, X):  # type: ignore[no-untyped-def]
    """Apply events ``E[..][start:]`` until one needs the Python path.

    ``E`` holds the batch's columns: session slot (-1 unknown), kind, context
    tokens, new tokens, step index, worker slot (``NO_WORKER`` when none is
    named), graph node of a tool wait (-1 unknown), latency hint, last step.
    ``X`` has a row for each event at least. Returns (index of the first event
    not applied, directives written to ``D``, ends written to ``X``, why it
    stopped: ``STOP``, ``FULL`` when ``D`` might not hold the next event's
    directives (one for the event and one per resident of its worker that
    relief may evict), ``RESUME`` when ends must be recorded first).
    """
    e_slot, e_kind, e_ctx, e_new, e_step, e_worker, e_node, e_hint, e_last = E
    R = _residency(S, W, T)
    P = _plan_arrays(S, W)
    L = (W[8], W[9], W[7])
    b_upper, b_mids, b_units = B
    g_1d = G[3]
    knee = params[P_KNEE]
    min_ttl = params[P_MIN_TTL]
    max_ttl = params[P_MAX_TTL]
    n_dur = B[0].shape[0]
    n_tok = int(params[P_TOK_N])
    scratch = np.empty(n_dur, dtype=np.float64)
    k = 0
    ends = 0
    completed = False  # a completion in this call, not recorded by fair share yet
    n = e_slot.shape[0]
    scratch[0] = _touch(e_slot[start:], S)
    i = start
    while i < n:
        s = e_slot[i]
        kind = e_kind[i]
        if s < 0 or kind < K_STEP_START or kind > K_SESSION_ABORT or kind == K_STEP_END:
            return i, k, ends, STOP
        w = S[2][s]
        to = e_worker[i]
        moving = to != NO_WORKER and to != w
        if moving:
            if w != NO_SLOT and S[3][s] != TIER_NONE:
                return i, k, ends, STOP  # a move: the old copy is released in Python
        else:
            to = w
        if kind == K_TOOL_CALL_WAIT:
            if e_node[i] < 0:
                return i, k, ends, STOP  # a node the graph creates first
            if to != NO_SLOT and S[3][s] == TIER_GPU and e_ctx[i] <= 0:
                return i, k, ends, STOP  # size unknown: the plain-lease path
        elif kind == K_SESSION_FINISH and params[P_LIVE_DUE] != 0.0:
            return i, k, ends, STOP  # the pass reads every session: Python runs it
        elif kind == K_STEP_START and completed and to != NO_SLOT:
            # relief would rank victims with eviction protection from before a
            # completion: stop if this step may run it (its blocks booked)
            used = W[2][to]
            if not W[11][to]:
                blocks = e_ctx[i] + e_new[i]
                blocks = -(-blocks // W[8][to]) if blocks > 0 else 0
                used += blocks - S[5][s]
            short, _need = _blocks_short(W[0][to], used, W[5][to], W[8][to], params)
            if short:
                return i, k, ends, RESUME
        if k + 1 + (W[17][to] if to != NO_SLOT else 0) > D[0].shape[0]:
            return i, k, ends, FULL
        a = S[1][s]
        gw = _weight(G, a, now)
        ctx_ev = e_ctx[i]
        # -- Engine.handle_batch's bookkeeping --
        t = S[0][s]
        T[0][t] += 1
        S[10][s] += 1
        if e_step[i] > S[9][s]:
            S[9][s] = e_step[i]
        S[14][s] = now
        if moving:
            # Engine._move_home of a session that holds nothing
            S[17][s] = 0.0
            S[12][s] = NO_TIMER
            _link(s, to, S, W, T)
            w = to
        duration = G[2][3 * a]
        node = S[11][s]
        if kind == K_STEP_START:
            prev_ctx = S[7][s]
            if node != NO_SLOT and S[4][s] != STATE_RUNNING:
                waited = now - S[15][s]
                b = _bucket(waited, params[P_DUR_LO], params[P_DUR_LOG_RATIO], n_dur)
                duration[node, b] += gw
            if node != NO_SLOT and S[15][s] >= 0.0:
                grown = ctx_ev - S[8][s]
                if grown < 0:
                    grown = 0
                b = _bucket(float(grown), params[P_TOK_LO], params[P_TOK_LOG_RATIO], n_tok)
                G[2][3 * a + 1][node, b] += gw
                G[3][4 * a][node] += grown * gw
                G[3][4 * a + 1][node] += gw
                G[3][4 * a + 2][node] += gw
                S[15][s] = -1.0
            S[4][s] = STATE_RUNNING
            S[23][s] = now
            S[17][s] = 0.0
            S[18][s] = 0.0
            S[12][s] = NO_TIMER
            S[7][s] = ctx_ev
            if w != NO_SLOT:
                added = ctx_ev - prev_ctx
                if added < 0:
                    added = 0
                S[22][s] += prefill_s(float(added), W[6][w], knee)
                blocks = ctx_ev + e_new[i]
                blocks = -(-blocks // W[8][w]) if blocks > 0 else 0
                _set_gpu_blocks(s, blocks, R)
                # NOTE: tested on scalars first: a call with these tuples costs
                # more than the test (numba passes every array field by field)
                short, need = _blocks_short(W[0][w], W[2][w], W[5][w], W[8][w], params)
                if short:
                    k = _relieve(w, need, now, s, protection, params, scratch, S, W, G, B, T, D, k)
        elif kind == K_TOOL_CALL_WAIT:
            # Engine._step_done: the decode's standalone time
            started = S[23][s]
            S[23][s] = -1.0
            out = ctx_ev - S[7][s]
            if started >= 0.0 and w != NO_SLOT and out > 0:
                floor = W[14][w]
                if not W[16][w]:
                    seen = (now - started) / out
                    if floor <= 0.0:
                        floor = seen
                    else:
                        floor = floor * (1.0 + params[P_DECODE_DRIFT])
                        if seen < floor:
                            floor = seen
                    W[14][w] = floor
                mean_ctx = S[7][s] + out / 2
                S[22][s] += out * (floor + mean_ctx * W[15][w])
            # Engine._enter_node
            dst = e_node[i]
            if node != NO_SLOT:
                G[2][3 * a + 2][node, dst] += gw
            S[11][s] = dst
            S[15][s] = now
            S[7][s] = ctx_ev
            S[8][s] = ctx_ev
            S[4][s] = STATE_TOOL_WAIT
            S[17][s] = 0.0
            S[20][s] = e_hint[i]
            exp_rem, early_rem, p_cont = _predict(
                duration[dst], g_1d[4 * a + 2][dst], g_1d[4 * a + 3][dst], b_upper, b_mids,
                b_units, params, scratch, 0.0, e_hint[i], e_last[i], gw,
            )  # fmt: skip
            S[16][s] = now + exp_rem
            S[19][s] = p_cont
            if w != NO_SLOT and S[3][s] == TIER_GPU:
                blocks = -(-ctx_ev // W[8][w]) if ctx_ev > 0 else 0
                _set_gpu_blocks(s, blocks, R)
                # Retention.decide_wait (no quotas)
                blocks = S[5][s]
                cap = W[0][w]
                price = shadow_price(
                    cap, W[2][w], W[5][w], W[6][w], params[P_IDLE_UTIL], params[P_MAX_PRICE],
                    params[P_DEMAND_W], params[P_DEMAND_H],
                )  # fmt: skip
                if price > W[13][w]:
                    W[13][w] = price
                move_s = _transfer_s(blocks, w, L)
                rebuild_s = prefill_s(float(S[7][s]), W[6][w], knee)
                room = W[1][w] - W[3][w] >= blocks > 0
                action, ttl, _cr, _co, _cl = retention_choice(
                    blocks, cap, price, exp_rem, p_cont, rebuild_s, move_s, move_s, room,
                    params[P_TRANSFER_W], min_ttl, max_ttl,
                )  # fmt: skip
                if action == RETAIN_GPU:
                    S[21][s] = price
                    S[17][s] = now + ttl
                    S[12][s] = now + ttl
                    S[13][s] = TIMER_LEASE
                    k = _emit(D, k, s, A_RETAIN_GPU, ttl, 0.0, R_TOOL_WAIT, S)
                elif action == OFFLOAD_HOST:
                    _to_host(s, R)
                    S[17][s] = 0.0
                    k = _emit(D, k, s, A_OFFLOAD_HOST, 0.0, move_s, R_TOOL_WAIT, S)
                    _plan_prefetch(s, w, p_cont, early_rem, now, move_s, params, P)
                else:
                    _release(s, R)
                    S[17][s] = 0.0
                    S[12][s] = NO_TIMER
                    k = _emit(D, k, s, A_RELEASE, 0.0, 0.0, R_TOOL_WAIT, S)
            elif w != NO_SLOT and S[3][s] == TIER_HOST:
                _plan_prefetch(s, w, p_cont, early_rem, now, 0.0, params, P)
        elif kind == K_TOOL_CALL_END:
            if S[4][s] == STATE_TOOL_WAIT and node != NO_SLOT:
                waited = now - S[15][s]
                b = _bucket(waited, params[P_DUR_LO], params[P_DUR_LOG_RATIO], n_dur)
                duration[node, b] += gw
                S[22][s] += waited
            S[4][s] = STATE_RUNNING
            if ctx_ev > S[7][s]:
                S[7][s] = ctx_ev
            leased_until = S[17][s]
            S[17][s] = 0.0
            S[12][s] = NO_TIMER
            if S[3][s] == TIER_GPU and w != NO_SLOT:
                # Retention.hold_until_step (no quotas)
                if S[5][s] > 0:
                    queue_s = W[5][w] / W[6][w]
                    ttl = min(max_ttl, min_ttl + 2.0 * queue_s)
                    if leased_until - now < ttl:
                        k = _emit(D, k, s, A_RETAIN_GPU, ttl, 0.0, R_TOOL_RETURNED, S)
            elif S[3][s] == TIER_HOST and w != NO_SLOT:
                # the tool returned before the planned prefetch: reload now
                S[16][s] = now
                k = _prefetch(s, now, R_TOOL_RETURNED, params, scratch, S, W, G, B, T, D, k)
            S[18][s] = 0.0
        else:  # K_SESSION_FINISH, K_SESSION_ABORT: Engine._finish
            finished = kind == K_SESSION_FINISH
            if node != NO_SLOT:
                G[2][3 * a + 2][node, FINISH_NODE] += gw
                if S[15][s] >= 0.0:
                    g_1d[4 * a + 3][node] += gw
            X[ends, 0] = s
            X[ends, 1] = k
            X[ends, 2] = finished
            ends += 1
            completed = completed or finished
            if w != NO_SLOT and S[3][s] != TIER_NONE:
                _release(s, R)
                code = R_SESSION_FINISH if finished else R_SESSION_ABORT
                k = _emit(D, k, s, A_RELEASE, 0.0, 0.0, code, S)
            # NOTE: the engine unlinks it and frees its slot after the directive
            # (sent to its home) is made; a released session is no victim meanwhile
        i += 1
    return i, k, ends, STOP


@njit(cache=True)
def apply_events(  # type: ignore[no-untyped-def]
    start, now, params, protection,
    e0, e1, e2, e3, e4, e5, e6, e7, e8,
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18,
    s19, s20, s21, s22, s23, s24, s25,
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17,
    g0, g1, g2, g3, b0, b1, b2, t0, t1, t2, d0, d1, d2, d3, d4, d5, d6, x,
):  # fmt: skip
    """Apply a batch's events from ``start`` (see ``_apply_events``); flat arguments:
    the 9 event columns, then ``S``, ``W``, ``G``, ``B``, ``T``, ``D`` unpacked, ``X``."""
    return _apply_events(
        start, now, params, (e0, e1, e2, e3, e4, e5, e6, e7, e8), protection,
        (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18,
         s19, s20, s21, s22, s23, s24, s25),
        (w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17),
        (g0, g1, g2, g3), (b0, b1, b2), (t0, t1, t2), (d0, d1, d2, d3, d4, d5, d6), x,
    )  # fmt: skip


@njit(cache=True)
def fire_timers(  # type: ignore[no-untyped-def]
    order, now, params, protection,
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18,
    s19, s20, s21, s22, s23, s24, s25,
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17,
    g0, g1, g2, g3, b0, b1, b2, t0, t1, t2, d0, d1, d2, d3, d4, d5, d6,
):  # fmt: skip
    """Fire the timers of sessions ``order`` (see ``_fire_timers``); flat arguments:
    ``S``, ``W``, ``G``, ``B``, ``T``, ``D`` unpacked."""
    return _fire_timers(
        order, now, params, protection,
        (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18,
         s19, s20, s21, s22, s23, s24, s25),
        (w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17),
        (g0, g1, g2, g3), (b0, b1, b2), (t0, t1, t2), (d0, d1, d2, d3, d4, d5, d6),
    )  # fmt: skip
