"""Validation of a batch of session events, before any of it is applied.

A batch is all or nothing: ``check_events`` walks it against the engine's
state plus what the batch itself creates and ends, and raises ``Rejected``
naming the first bad field (``events[3].context_tokens``). It changes nothing.
``check_columns`` is the same check over a batch already turned into columns
(the compiled batch path's), vectorised; on any doubt it runs ``check_events``,
so the error raised is always the one ``check_events`` names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import EventKind, Rejected, SessionEvent, SessionId, TenantId
from scheduler_service.kernels.checks import columns_valid
from scheduler_service.kernels.events import NO_WORKER
from scheduler_service.state import ClusterState

_OPENERS = (EventKind.STEP_START, EventKind.SESSION_ABORT)
_ENDERS = (EventKind.SESSION_FINISH, EventKind.SESSION_ABORT)
_FIRST_ENDER = int(min(_ENDERS))  # an int: numpy probes an enum for array protocols


def check_events(
    state: ClusterState, tenant_names: Sequence[TenantId], events: Sequence[SessionEvent]
) -> None:
    """Raise Rejected for the first invalid event of ``events``; changes nothing."""
    slot_of = state.sessions.slot_of
    tenant_v = state.sessions.tenant_v
    workers = state.workers.slot_of
    # what the batch itself does to session existence, in order
    born: dict[SessionId, TenantId] = {}
    ended: set[SessionId] = set()
    # NOTE: locals for the per-event loop: it runs before every batch is applied
    inf = math.inf
    born_get = born.get
    slot_get = slot_of.get
    for i, ev in enumerate(events):
        if ev.context_tokens < 0 or ev.new_tokens < 0 or ev.step_index < 0:
            for name in ("context_tokens", "new_tokens", "step_index"):
                if getattr(ev, name) < 0:
                    raise Rejected(f"events[{i}].{name}", "must be >= 0")
        # one comparison catches negative, NaN (compares false) and infinite
        if not 0.0 <= ev.expected_tool_latency_s < inf:
            raise Rejected(f"events[{i}].expected_tool_latency_s", "must be a finite number >= 0")
        wid = ev.worker_id
        if wid and wid not in workers:
            raise Rejected(f"events[{i}].worker_id", f"unknown worker {wid!r}")
        sid = ev.session_id
        owner: TenantId | None = born_get(sid)
        if owner is None and sid not in ended:
            slot = slot_get(sid)
            owner = None if slot is None else tenant_names[tenant_v[slot]]
        if owner is None:
            if ev.kind not in _OPENERS:
                raise Rejected(
                    f"events[{i}].session_id",
                    f"unknown session {sid!r}: its first event must be STEP_START",
                )
            if ev.kind is EventKind.STEP_START:
                born[sid] = ev.tenant_id
                ended.discard(sid)
            continue
        if owner != ev.tenant_id:
            raise Rejected(f"events[{i}].tenant_id", f"session {sid!r} belongs to another tenant")
        if ev.kind in _ENDERS:
            born.pop(sid, None)
            ended.add(sid)
        elif sid not in born:
            born[sid] = owner


def check_columns(
    state: ClusterState,
    tenant_names: Sequence[TenantId],
    tenant_index: Mapping[TenantId, int],
    events: Sequence[SessionEvent],
    ids: tuple[Sequence[Any], ...],
    columns: tuple[npt.NDArray[Any], ...],
    workers: Sequence[int],
) -> None:
    """``check_events`` over ``events`` given as columns; raises what it raises.

    ``ids``: the events' session, tenant and worker ids; ``columns``: their
    sessions' slots (-1 unknown), kinds' values, context tokens, new tokens,
    step indexes and latency hints; ``workers``: their workers' slots
    (``NO_WORKER`` for an empty or unknown id).
    """
    sids, tids, wids = ids
    slots, kinds, ctx, new, step, hints = columns
    n = len(events)
    bad = NO_WORKER in workers and any(
        w for w, x in zip(wids, workers, strict=True) if x == NO_WORKER
    )
    # Session existence needs the walk in order only for the sessions the batch
    # starts or ends; every other event's session exists and keeps its tenant.
    plain = np.ones(n, dtype=np.bool_)
    if not bad:
        # NOTE: .nonzero() (a method), not np.flatnonzero: the batch path runs
        # this per batch, and the function's Python wrappers cost as much
        walk_at = ((slots < 0) | (kinds >= _FIRST_ENDER)).nonzero()[0]
        if walk_at.size:
            walk = set(map(sids.__getitem__, walk_at.tolist()))
            on_walk = np.fromiter(map(walk.__contains__, sids), np.bool_, n)
            try:
                check_events(
                    state,
                    tenant_names,
                    list(map(events.__getitem__, on_walk.nonzero()[0].tolist())),
                )
            except Rejected:
                bad = True
            plain = ~on_walk
    if not bad:
        given = np.fromiter(map(tenant_index.get, tids, repeat(-1)), np.int64, n)
        bad = not columns_valid(slots, ctx, new, step, hints, given, plain, state.sessions.tenant)
    if bad:
        check_events(state, tenant_names, events)  # raises, naming the first bad field
