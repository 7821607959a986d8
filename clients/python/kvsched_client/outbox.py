"""The worker's outbound buffer: batching, seq numbering, cumulative acks, resend.

Pure bookkeeping (no I/O, no clock), safe to call from engine threads: an
engine reports events from any thread and never blocks; the stream task frames
what is pending into messages, and keeps each one until the server acks it.

Framing: session events, KV event batches and directive answers pending at
once go out together in ``WorkerBatch`` messages (one journal record and one
ack for all of them); pool snapshots and heartbeats travel alone, in their
place in the order. ``combine=False`` frames one message per kind, as servers
before ``WorkerBatch`` need.

Seqs: the Hello of every stream is seq 1; data messages take 2, 3, ... for the
whole life of the worker epoch, so a message resent on a new stream keeps its
seq and the server drops it as a duplicate when it already holds it.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2

__all__ = ["HELLO_SEQ", "Outbox", "OutboxStats"]

HELLO_SEQ = 1
MAX_BATCH_ACKS = 4096  # the server's limit on directive answers in one WorkerBatch
# a refusal that names one session event of a message: "…session_events[i]…"
_REFUSED_EVENT = re.compile(r"^(?:batch\.session_events|session_events\.events)\[(\d+)\]")


@dataclass(slots=True)
class OutboxStats:
    """Counters since the outbox was built."""

    framed_messages: int = 0
    resent_messages: int = 0
    dropped_session_events: int = 0
    dropped_kv_batches: int = 0
    dropped_heartbeats: int = 0


class Outbox:
    """Pending events and unacked messages (see module doc)."""

    def __init__(
        self,
        *,
        max_batch_events: int = 256,
        max_buffered_events: int = 100_000,
        max_buffered_kv_batches: int = 10_000,
        on_acked: Callable[[worker_pb2.WorkerMessage], None] | None = None,
        combine: bool = True,
    ) -> None:
        if not 1 <= max_batch_events <= 4096:
            raise ValueError("max_batch_events must be in 1..4096 (the wire limit)")
        self.max_batch_events = max_batch_events
        self.max_buffered_events = max_buffered_events
        self.max_buffered_kv_batches = max_buffered_kv_batches
        self.combine = combine
        self._lock = threading.Lock()
        self._events: deque[types_pb2.SessionEvent] = deque()
        self._kv: deque[types_pb2.KvEventBatch] = deque()
        self._control: deque[worker_pb2.WorkerMessage] = deque()
        self._unacked: deque[worker_pb2.WorkerMessage] = deque()
        self._unacked_events = 0  # session events inside unacked messages
        self._unacked_kv = 0
        self.next_seq = HELLO_SEQ + 1
        self.acked_seq = 0
        self.stats = OutboxStats()
        # Called once per message the server acked (outside the lock), in seq
        # order: a load test timestamps acks with it.
        self._on_acked = on_acked

    # ------------------------------------------------------------------ input

    def add_events(self, events: Iterable[types_pb2.SessionEvent]) -> None:
        """Queues session events; drops the oldest ones past the bound."""
        with self._lock:
            self._events.extend(events)
            self._bound_events()

    def add_kv(self, batch: types_pb2.KvEventBatch) -> None:
        """Queues one KV event batch; drops the oldest batch past the bound."""
        with self._lock:
            self._kv.append(batch)
            while len(self._kv) + self._unacked_kv > self.max_buffered_kv_batches:
                if self._drop_oldest_unacked(_KV) is None:
                    self._kv.popleft()
                    self.stats.dropped_kv_batches += 1

    def add_control(self, msg: worker_pb2.WorkerMessage) -> None:
        """Queues a DirectiveAck, PoolSnapshot or Heartbeat (never dropped for space)."""
        with self._lock:
            self._control.append(msg)

    # ----------------------------------------------------------------- output

    def pending_events(self) -> int:
        """Returns session events not yet framed."""
        return len(self._events)

    def has_pending(self) -> bool:
        """True when something waits to be framed."""
        return bool(self._events or self._kv or self._control)

    def idle(self) -> bool:
        """True when everything reported has been acked."""
        return not self.has_pending() and not self._unacked

    def frame(self) -> list[worker_pb2.WorkerMessage]:
        """Moves what is pending into new messages (with seqs) and returns them."""
        with self._lock:
            return self._frame_combined() if self.combine else self._frame_by_kind()

    def _frame_by_kind(self) -> list[worker_pb2.WorkerMessage]:
        out: list[worker_pb2.WorkerMessage] = []
        while self._control:
            out.append(self._seal(self._control.popleft()))
        while self._kv:
            out.append(self._seal(worker_pb2.WorkerMessage(kv_events=self._kv.popleft())))
        while self._events:
            out.append(self._seal(worker_pb2.WorkerMessage(session_events=self._event_batch())))
        return out

    def _frame_combined(self) -> list[worker_pb2.WorkerMessage]:
        out: list[worker_pb2.WorkerMessage] = []
        acks: list[worker_pb2.DirectiveAck] = []
        while self._control:
            m = self._control.popleft()
            if m.WhichOneof("body") == "directive_ack":
                acks.append(m.directive_ack)
                if len(acks) < MAX_BATCH_ACKS:
                    continue
            elif not acks:
                out.append(self._seal(m))
                continue
            # answers queued before a snapshot or heartbeat go out before it
            batch = worker_pb2.WorkerBatch(directive_acks=acks)
            out.append(self._seal(worker_pb2.WorkerMessage(batch=batch)))
            acks = []
            if m.WhichOneof("body") != "directive_ack":
                out.append(self._seal(m))
        while acks or self._kv or self._events:
            b = worker_pb2.WorkerBatch(directive_acks=acks)
            acks = []
            if self._kv:
                b.kv_events.CopyFrom(self._kv.popleft())
            if self._events:
                b.session_events.extend(self._event_batch().events)
            out.append(self._seal(worker_pb2.WorkerMessage(batch=b)))
        return out

    def _event_batch(self) -> worker_pb2.SessionEventBatch:
        n = min(self.max_batch_events, len(self._events))
        return worker_pb2.SessionEventBatch(events=[self._events.popleft() for _ in range(n)])

    def ack(self, seq: int) -> int:
        """Forgets every message with seq <= `seq`; returns how many."""
        done: list[worker_pb2.WorkerMessage] = []
        with self._lock:
            self.acked_seq = max(self.acked_seq, seq)
            while self._unacked and self._unacked[0].seq <= seq:
                msg = self._unacked.popleft()
                self._forget(msg)
                done.append(msg)
        if self._on_acked is not None:
            for msg in done:
                self._on_acked(msg)
        return len(done)

    def resume(self, last_acked_seq: int) -> list[worker_pb2.WorkerMessage]:
        """After a Welcome: returns the unacked messages to resend, in seq order.

        Heartbeats are not resent: a stale load figure is worse than none.
        """
        self.ack(last_acked_seq)
        with self._lock:
            kept: deque[worker_pb2.WorkerMessage] = deque()
            for m in self._unacked:
                if m.WhichOneof("body") == "heartbeat":
                    self.stats.dropped_heartbeats += 1
                else:
                    kept.append(m)
            self._unacked = kept
            self.stats.resent_messages += len(kept)
            return list(kept)

    def drop_oldest_unacked(self) -> worker_pb2.WorkerMessage | None:
        """Drops the oldest unacked message (one the server refused); returns it."""
        with self._lock:
            if not self._unacked:
                return None
            msg = self._unacked.popleft()
            self._forget(msg)
            return msg

    def trim_refused(self, seq: int, field: str) -> int | None:
        """Take what the server refused out of unacked message ``seq``; keep the rest.

        When ``field`` names one session event, every event of that event's
        session leaves the message (the server refuses them all alike, e.g.
        a session it does not know yet) and the rest is resent under the same
        seq; returns how many left. Otherwise, or when nothing is left, the
        whole message goes; returns None.
        """
        match = _REFUSED_EVENT.match(field)
        with self._lock:
            for i, m in enumerate(self._unacked):
                if m.seq != seq:
                    continue
                events = _events_of(m)
                if events is None or match is None or int(match.group(1)) >= len(events):
                    del self._unacked[i]
                    self._forget(m)
                    return None
                sid = events[int(match.group(1))].session_id
                keep = [e for e in events if e.session_id != sid]
                removed = len(events) - len(keep)
                del events[:]
                events.extend(keep)
                self._unacked_events -= removed
                self.stats.dropped_session_events += removed
                if not keep and not (m.WhichOneof("body") == "batch" and _has_other(m.batch)):
                    del self._unacked[i]
                    self._forget(m)
                    return None
                return removed
            return None

    def unacked(self) -> list[worker_pb2.WorkerMessage]:
        """Returns the unacked messages (for tests and debugging)."""
        with self._lock:
            return list(self._unacked)

    # -------------------------------------------------------------- internals

    def _seal(self, msg: worker_pb2.WorkerMessage) -> worker_pb2.WorkerMessage:
        msg.seq = self.next_seq
        self.next_seq += 1
        self._unacked.append(msg)
        events, kv = _parts(msg)
        self._unacked_events += events
        self._unacked_kv += kv
        self.stats.framed_messages += 1
        return msg

    def _forget(self, msg: worker_pb2.WorkerMessage) -> None:
        events, kv = _parts(msg)
        self._unacked_events -= events
        self._unacked_kv -= kv

    def _bound_events(self) -> None:
        # NOTE: the oldest events go first, and those already framed are older
        # than those pending. A framed message that is dropped may still reach
        # the server on the live stream; it is only no longer resent.
        while len(self._events) + self._unacked_events > self.max_buffered_events:
            if self._drop_oldest_unacked(_EVENTS) is None:
                self._events.popleft()
                self.stats.dropped_session_events += 1

    def _drop_oldest_unacked(self, part: int) -> worker_pb2.WorkerMessage | None:
        """Drops the oldest unacked message holding session events or KV events.

        # NOTE: a WorkerBatch goes whole: whatever else it held (directive
        # answers, the other kind of events) is dropped with it, and counted.
        """
        for i, m in enumerate(self._unacked):
            parts = _parts(m)
            if parts[part]:
                del self._unacked[i]
                self._forget(m)
                self.stats.dropped_session_events += parts[_EVENTS]
                self.stats.dropped_kv_batches += parts[_KV]
                return m
        return None


_EVENTS, _KV = 0, 1


def _parts(msg: worker_pb2.WorkerMessage) -> tuple[int, int]:
    """(session events, KV batches) a message carries."""
    body = msg.WhichOneof("body")
    events = _events_of(msg)
    kv = body == "kv_events" or (body == "batch" and msg.batch.HasField("kv_events"))
    return (len(events) if events is not None else 0), int(kv)


def _events_of(msg: worker_pb2.WorkerMessage) -> Any:
    """The session events container of a message (None for other kinds)."""
    body = msg.WhichOneof("body")
    if body == "batch":
        return msg.batch.session_events
    if body == "session_events":
        return msg.session_events.events
    return None


def _has_other(b: worker_pb2.WorkerBatch) -> bool:
    """A batch still carries directive answers or KV events."""
    return bool(b.directive_acks) or b.HasField("kv_events")
