"""The valid order of a session's events, for tests that generate random traffic."""

from __future__ import annotations

from scheduler_service.domain import EventKind

K = EventKind

#: The next kind a session may send, given the last one (None: not started).
NEXT: dict[EventKind | None, list[EventKind]] = {
    None: [K.STEP_START],
    K.STEP_START: [K.TOOL_CALL_WAIT, K.STEP_END, K.SESSION_FINISH],
    K.TOOL_CALL_WAIT: [K.TOOL_CALL_END, K.SESSION_ABORT, K.STEP_START],
    K.TOOL_CALL_END: [K.STEP_START],
    K.STEP_END: [K.STEP_START, K.TOOL_CALL_WAIT, K.SESSION_FINISH],
}
