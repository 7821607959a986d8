"""Outbox: framing into WorkerBatch messages, and on_acked (each acked message once, in order)."""

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
    # the answer rides with the first two events; the rest two by two
    assert [m.seq for m in msgs] == [2, 3, 4]
    assert ob.ack(3) == 2
    assert seen == [2, 3]
    assert ob.ack(3) == 0  # a repeated ack calls nothing
    assert ob.ack(5) == 1
    assert seen == [2, 3, 4]


def test_resume_acks_call_on_acked_too() -> None:
    seen: list[int] = []
    ob = Outbox(on_acked=lambda m: seen.append(m.seq))
    ob.add_events([_ev(0)])
    ob.frame()
    assert ob.resume(2) == []
    assert seen == [2]


def _ack(did: str) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(directive_ack=worker_pb2.DirectiveAck(directive_id=did))


def _kv(n: int) -> types_pb2.KvEventBatch:
    stored = types_pb2.BlockStored(block_hashes=[types_pb2.BlockHash(uint64_hash=n)])
    return types_pb2.KvEventBatch(events=[types_pb2.KvEvent(stored=stored)])


def _shape(m: worker_pb2.WorkerMessage) -> tuple[object, ...]:
    body = m.WhichOneof("body")
    if body != "batch":
        return (m.seq, body)
    b = m.batch
    return (
        m.seq,
        [a.directive_id for a in b.directive_acks],
        [e.stored.block_hashes[0].uint64_hash for e in b.kv_events.events],
        [e.event_id for e in b.session_events],
    )


def test_everything_pending_goes_in_batches_and_heartbeats_keep_their_place() -> None:
    ob = Outbox(max_batch_events=2)
    ob.add_control(_ack("d1"))
    ob.add_control(worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat(gpu_free_blocks=1)))
    ob.add_control(_ack("d2"))
    ob.add_control(_ack("d3"))
    ob.add_kv(_kv(7))
    ob.add_kv(_kv(8))
    ob.add_events(_ev(i) for i in range(3))
    assert [_shape(m) for m in ob.frame()] == [
        (2, ["d1"], [], []),  # answered before the heartbeat was queued: sent before it
        (3, "heartbeat"),
        (4, ["d2", "d3"], [7], ["e0", "e1"]),
        (5, [], [8], ["e2"]),
    ]
    assert ob.frame() == []


def test_one_message_per_kind_without_combining() -> None:
    ob = Outbox(max_batch_events=2, combine=False)
    ob.add_control(_ack("d1"))
    ob.add_kv(_kv(7))
    ob.add_events(_ev(i) for i in range(3))
    bodies = [m.WhichOneof("body") for m in ob.frame()]
    assert bodies == ["directive_ack", "kv_events", "session_events", "session_events"]


def test_a_dropped_batch_counts_every_event_and_kv_batch_it_held() -> None:
    ob = Outbox(max_batch_events=4, max_buffered_events=6, max_buffered_kv_batches=10)
    ob.add_kv(_kv(1))
    ob.add_events(_ev(i) for i in range(4))
    [first] = ob.frame()
    ob.add_events(_ev(i) for i in range(4, 7))  # 7 > 6: the oldest framed batch goes
    assert ob.stats.dropped_session_events == 4
    assert ob.stats.dropped_kv_batches == 1
    assert first not in ob.unacked()
    assert [e.event_id for m in ob.frame() for e in m.batch.session_events] == ["e4", "e5", "e6"]


def _sev(eid: str, sid: str) -> types_pb2.SessionEvent:
    return types_pb2.SessionEvent(event_id=eid, session_id=sid, kind=types_pb2.STEP_START)


def test_trimming_a_refusal_takes_out_that_session_and_keeps_the_rest() -> None:
    ob = Outbox()
    ob.add_control(_ack("d1"))
    ob.add_events([_sev("x0", "x"), _sev("y0", "y"), _sev("x1", "x")])
    [m] = ob.frame()
    assert ob.trim_refused(m.seq, "batch.session_events[2].session_id") == 2
    [kept] = ob.unacked()
    assert kept.seq == m.seq
    assert [e.event_id for e in kept.batch.session_events] == ["y0"]
    assert [a.directive_id for a in kept.batch.directive_acks] == ["d1"]
    assert ob.stats.dropped_session_events == 2
    # nothing but the refused session: the message goes whole
    ob.add_events([_sev("z0", "z")])
    [z] = ob.frame()
    assert ob.trim_refused(z.seq, "batch.session_events[0].tenant_id") is None
    assert [u.seq for u in ob.unacked()] == [m.seq]
    # a refusal that names no event drops the message whole
    assert ob.trim_refused(m.seq, "batch.kv_events.events[0]") is None
    assert ob.unacked() == [] and ob.idle()
