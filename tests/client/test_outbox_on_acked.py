"""Outbox's on_acked callback: each acked message once, in seq order."""

from __future__ import annotations

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.outbox import Outbox


def _ev(i: int) -> types_pb2.SessionEvent:
    return types_pb2.SessionEvent(event_id=f"e{i}", session_id="s", kind=types_pb2.STEP_START)


def test_on_acked_sees_each_acked_message_once_in_seq_order() -> None:
    seen: list[int] = []
    ob = Outbox(max_batch_events=2, on_acked=lambda m: seen.append(m.seq))
    ob.add_events(_ev(i) for i in range(5))
    ob.add_control(
        worker_pb2.WorkerMessage(directive_ack=worker_pb2.DirectiveAck(directive_id="d"))
    )
    msgs = ob.frame()
    assert [m.seq for m in msgs] == [2, 3, 4, 5]
    assert ob.ack(3) == 2
    assert seen == [2, 3]
    assert ob.ack(3) == 0  # a repeated ack calls nothing
    assert ob.ack(5) == 2
    assert seen == [2, 3, 4, 5]


def test_resume_acks_call_on_acked_too() -> None:
    seen: list[int] = []
    ob = Outbox(on_acked=lambda m: seen.append(m.seq))
    ob.add_events([_ev(0)])
    ob.frame()
    assert ob.resume(2) == []
    assert seen == [2]
