"""Hypothesis state machine over dispatcher + engine + journal with a crash rule.

Any interleaving of worker hellos, event batches, heartbeats, KV events, ticks,
snapshots and crashes leaves the recovered state equal to the state before the
crash, and the accounting (events accepted, live sessions) exact.
"""

from __future__ import annotations

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from scheduler_service.api.dispatch import Dispatcher, StreamHandle
from scheduler_service.domain import Rejected, SessionId, WorkerId
from scheduler_service.engine import Engine
from scheduler_service.journal import MemoryJournal
from scheduler_service.telemetry import Metrics

WORKERS = ("w0", "w1", "w2")
SESSIONS = tuple(f"s{i}" for i in range(6))
K = types_pb2.SessionEventKind


def fingerprint(d: Dispatcher, now: float) -> tuple[object, ...]:
    e = d.engine
    sessions = tuple(
        (
            v.session_id,
            int(v.state),
            int(v.tier),
            v.context_tokens,
            v.step_index,
            v.events,
            v.home_worker_id,
            round(v.lease_remaining_s, 9),
        )
        for sid in SESSIONS
        if (v := e.session_view(SessionId(sid), now)) is not None
    )
    workers = tuple(
        (w.spec.worker_id, w.spec.epoch, w.connected, w.draining, w.gpu_used_blocks, w.sessions)
        for w in e.worker_views()
    )
    st_ = e.stats(now)
    return sessions, workers, st_.events_total, st_.directives_total, d.last_acked_seq("w0", 1)


class Recovery(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.journal = MemoryJournal()  # the durable medium: survives "crashes"
        self.d = Dispatcher(Engine(), self.journal, Metrics.create())
        self.handles: dict[str, StreamHandle] = {}
        self.seq: dict[str, int] = {}
        self.now = 0.0
        self.accepted_events = 0
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def teardown(self) -> None:
        self.loop.close()

    def _run(self, fn):  # type: ignore[no-untyped-def]
        async def go():  # type: ignore[no-untyped-def]
            return fn()

        return self.loop.run_until_complete(go())

    @rule(w=st.sampled_from(WORKERS), dt=st.floats(0.0, 2.0))
    def hello(self, w: str, dt: float) -> None:
        self.now += dt
        msg = worker_pb2.Hello(
            worker_id=w,
            epoch=1,
            cache_spec=types_pb2.CacheSpec(
                block_size_tokens=16,
                bytes_per_token=131072,
                gpu_capacity_blocks=2_000,
                host_capacity_blocks=4_000,
                prefill_tokens_per_s=2e4,
                host_link_bytes_per_s=2.5e10,
            ),
        )
        self._run(lambda: self.d.hello(msg, self.now))
        h = StreamHandle(WorkerId(w), 1, send=lambda m: None, close=lambda r: None)
        h.last_seq_in_stream = self.d.last_acked_seq(w, 1)
        self.handles[w] = h
        self.seq.setdefault(w, 1)

    def _send(self, w: str, msg: worker_pb2.WorkerMessage) -> bool:
        self.seq[w] += 1
        msg.seq = self.seq[w]
        try:
            self._run(lambda: self.d.worker_message(self.handles[w], msg, self.now))
            return True
        except Rejected:
            self.seq[w] -= 1
            self.handles[w].last_seq_in_stream = self.seq[w]
            return False

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), n=st.integers(1, 4), dt=st.floats(0.0, 5.0))
    def events(self, data: st.DataObject, n: int, dt: float) -> None:
        self.now += dt
        w = data.draw(st.sampled_from(sorted(self.handles)))
        evs = []
        for i in range(n):
            sid = data.draw(st.sampled_from(SESSIONS))
            kind = data.draw(
                st.sampled_from(
                    [K.STEP_START, K.STEP_END, K.TOOL_CALL_WAIT, K.TOOL_CALL_END, K.SESSION_FINISH]
                )
            )
            evs.append(
                types_pb2.SessionEvent(
                    event_id=f"e{self.now}-{i}",
                    session_id=sid,
                    tenant_id="acme",
                    agent_type="swe-agent",
                    step_index=data.draw(st.integers(0, 5)),
                    kind=kind,
                    context_tokens=data.draw(st.integers(0, 60_000)),
                    new_tokens=50,
                    tool_name="pytest" if kind in (K.TOOL_CALL_WAIT, K.TOOL_CALL_END) else "",
                )
            )
        msg = worker_pb2.WorkerMessage(session_events=worker_pb2.SessionEventBatch(events=evs))
        if self._send(w, msg):
            self.accepted_events += n

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), free=st.integers(0, 2_000), queued=st.integers(0, 100_000))
    def heartbeat(self, data: st.DataObject, free: int, queued: int) -> None:
        w = data.draw(st.sampled_from(sorted(self.handles)))
        self._send(
            w,
            worker_pb2.WorkerMessage(
                heartbeat=worker_pb2.Heartbeat(gpu_free_blocks=free, queued_prefill_tokens=queued)
            ),
        )

    @rule(dt=st.floats(0.0, 30.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._run(lambda: self.d.tick(self.now))

    @rule()
    def snapshot(self) -> None:
        self._run(lambda: self.d.snapshot(self.now))

    @rule()
    def crash_and_recover(self) -> None:
        before = fingerprint(self.d, self.now)
        self.d = Dispatcher(Engine(), self.journal, Metrics.create())
        self.d.replay()
        assert fingerprint(self.d, self.now) == before
        for w, h in self.handles.items():
            h.last_seq_in_stream = self.d.last_acked_seq(w, 1)

    @invariant()
    def events_are_counted_once(self) -> None:
        assert self.d.engine.stats(self.now).events_total == self.accepted_events


TestRecovery = Recovery.TestCase
TestRecovery.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
