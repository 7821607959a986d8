"""Validation of a batch of session events, before any of it is applied.

A batch is all or nothing: ``check_events`` walks it against the engine's
state plus what the batch itself creates and ends, and raises ``Rejected``
naming the first bad field (``events[3].context_tokens``). It changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scheduler_service.domain import EventKind, Rejected, SessionEvent, SessionId, TenantId
from scheduler_service.state import ClusterState

_OPENERS = (EventKind.STEP_START, EventKind.SESSION_ABORT)
_ENDERS = (EventKind.SESSION_FINISH, EventKind.SESSION_ABORT)


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
