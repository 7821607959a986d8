"""WorkerClient: the worker's stream to kvsched, and the enforcement loop.

One long-lived `WorkerService.Connect` stream per replica: Hello (seq 1), then
batched session and KV events; cumulative Acks free the outbound buffer; on any
failure the client reconnects with exponential backoff and full jitter and
resends everything unacked (`resume_from_seq`). Downstream, each
RetentionDirective goes to the pool and is answered with a DirectiveAck;
ResyncRequest is answered with a PoolSnapshot.

Fail open: reporting never blocks the engine (a bounded buffer drops the oldest
session events), and leases are expired by a local timer that runs whether or
not a scheduler is reachable, so no KV is held for a dead scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from kvsched_client.outbox import HELLO_SEQ, Outbox
from kvsched_client.pool_api import KVPool

__all__ = ["SyncWorkerClient", "WorkerClient", "WorkerClientStats", "session_event"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_RECENT_DIRECTIVES = 4096
_MAX_KV_EVENTS_PER_BATCH = 4096


def session_event(
    session_id: str,
    kind: int,
    *,
    tenant_id: str = "default",
    agent_type: str = "agent",
    step_index: int = 0,
    context_tokens: int = 0,
    new_tokens: int = 0,
    tool_name: str = "",
    event_id: str | None = None,
) -> types_pb2.SessionEvent:
    """Returns a SessionEvent with a fresh event id and the wall-clock time."""
    return types_pb2.SessionEvent(
        event_id=event_id or uuid.uuid4().hex,
        session_id=session_id,
        tenant_id=tenant_id,
        agent_type=agent_type,
        step_index=step_index,
        kind=kind,  # type: ignore[arg-type]
        context_tokens=context_tokens,
        new_tokens=new_tokens,
        tool_name=tool_name,
        event_time_s=time.time(),
    )


@dataclass(slots=True)
class WorkerClientStats:
    """Counters since the client started."""

    connects: int = 0
    stream_failures: int = 0
    directives_applied: int = 0
    directives_rejected: int = 0
    directives_stale: int = 0
    directives_repeated: int = 0
    snapshots_sent: int = 0
    heartbeats_sent: int = 0
    refused_messages: int = 0
    leases_expired: int = 0


class _StreamEnded(Exception):
    pass


async def _raise_status(call: grpc.aio.StreamStreamCall) -> None:
    """Raises the call's final status as an AioRpcError unless it is OK."""
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )


class WorkerClient:
    """Async worker stream (see module doc). Create and use it on one event loop."""

    def __init__(
        self,
        target: str,
        hello: worker_pb2.Hello,
        pool: KVPool,
        *,
        pool_lock: threading.RLock | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_batch_events: int = 256,
        max_batch_delay_s: float = 0.002,
        max_buffered_events: int = 100_000,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        heartbeat_interval_s: float | None = None,
        lease_check_interval_s: float = 0.05,
        collect_pool_events: bool = True,
        channel_options: Iterable[tuple[str, object]] = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        on_drain: Callable[[worker_pb2.Drain], None] | None = None,
        on_acked: Callable[[worker_pb2.WorkerMessage], None] | None = None,
        rng: random.Random | None = None,
        combine_messages: bool = True,
    ) -> None:
        if hello.epoch < 1 or not hello.worker_id:
            raise ValueError("hello needs a worker_id and an epoch >= 1")
        self.target = target
        self.hello = worker_pb2.Hello()
        self.hello.CopyFrom(hello)
        if not self.hello.HasField("cache_spec"):
            self.hello.cache_spec.CopyFrom(pool.cache_spec())
        self.hello.accepts_server_batch = True  # _read handles ServerBatch
        self.pool = pool
        # The engine holds this lock while it touches the pool from its own threads.
        self.pool_lock = pool_lock or threading.RLock()
        self.outbox = Outbox(
            max_batch_events=max_batch_events,
            max_buffered_events=max_buffered_events,
            on_acked=on_acked,
            combine=combine_messages,
        )
        self.stats = WorkerClientStats()
        self.leader_epoch = 0  # highest leader epoch seen (Welcome or directive)
        self.welcome: worker_pb2.Welcome | None = None
        self.drain: worker_pb2.Drain | None = None
        self.worker_drained = False
        self._clock = clock
        self._max_batch_delay_s = max_batch_delay_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._heartbeat_override_s = heartbeat_interval_s
        self._lease_check_interval_s = lease_check_interval_s
        self._collect_pool_events = collect_pool_events
        self._channel_options = list(channel_options)
        # A worker-role bearer token (`--auth token` servers) and TLS credentials.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = credentials
        self._on_drain = on_drain
        self._rng = rng or random.Random()
        self._recent: OrderedDict[str, worker_pb2.DirectiveAck] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._wake_armed = False
        self._acked = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = False
        self._welcomed = False  # the current stream got its Welcome
        self._drop_first_resend = False
        self._refused_seq = 0  # the server named this message as the one it refused
        self._refused_field = ""  # ... and this field of it
        self._tasks: list[asyncio.Task[None]] = []

    # --------------------------------------------------------- engine-facing

    def report(self, *events: types_pb2.SessionEvent) -> None:
        """Queues session events; never blocks (callable from any thread)."""
        self.outbox.add_events(events)
        self._poke()

    def report_kv_events(self, batch: types_pb2.KvEventBatch) -> None:
        """Queues one KV event batch; never blocks (callable from any thread)."""
        self.outbox.add_kv(batch)
        self._poke()

    @property
    def connected(self) -> bool:
        """True while a stream is open and welcomed."""
        return self._connected.is_set()

    async def start(self) -> None:
        """Starts the stream and the lease timer in the background."""
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._run(), name="kvsched-worker-stream"),
            asyncio.create_task(self._lease_timer(), name="kvsched-lease-timer"),
        ]

    async def wait_connected(self, timeout_s: float) -> bool:
        """Waits until a stream is welcomed; returns False on timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        return self._connected.is_set()

    async def flush(self, timeout_s: float) -> bool:
        """Waits until everything reported so far is acked; returns False on timeout."""
        # Real time, not the pool's clock: a simulator may run that one fast.
        deadline = time.monotonic() + timeout_s
        self._poke()
        while not self.outbox.idle():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._acked.clear()
            if self.outbox.idle():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(left, 0.05))
        return True

    async def stop(self, flush_timeout_s: float = 1.0) -> None:
        """Flushes (bounded), then closes the stream and stops the timers."""
        if self._connected.is_set() and flush_timeout_s > 0:
            await self.flush(flush_timeout_s)
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._connected.clear()

    # --------------------------------------------------------------- stream

    def _poke(self) -> None:
        if self._wake_armed or self._loop is None:
            return
        self._wake_armed = True
        with contextlib.suppress(RuntimeError):  # a closed loop: the client is stopped
            self._loop.call_soon_threadsafe(self._wake.set)

    def backoff_s(self, attempt: int) -> float:
        """Returns the delay before reconnect `attempt` (0-based): full jitter."""
        initial_s, max_s = self._backoff
        return self._rng.uniform(0.0, min(max_s, initial_s * 2.0**attempt))

    async def _run(self) -> None:
        attempt = 0
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(
                self.target, self._credentials, options=self._channel_options
            )
        else:
            channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
        async with channel as ch:
            stub = worker_pb2_grpc.WorkerServiceStub(ch)
            while not self._stopping:
                self._welcomed = False
                try:
                    await self._stream(stub)
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as err:
                    self._stream_failed(err)
                except Exception as exc:  # a broken stream must never end the client
                    log.warning("kvsched stream error: %r", exc)
                finally:
                    self._connected.clear()
                self.stats.stream_failures += 1
                attempt = 0 if self._welcomed else attempt + 1
                await asyncio.sleep(self.backoff_s(attempt))

    def _stream_failed(self, err: grpc.aio.AioRpcError) -> None:
        log.info("kvsched stream closed: %s %s", err.code().name, err.details())
        # NOTE: the server applies a stream in order and closes it at the first
        # message it refuses; resending that one would fail forever. The next
        # Welcome says what it holds, and the first message after that is the bad one.
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and self._welcomed:
            self._drop_first_resend = True

    async def _stream(self, stub: worker_pb2_grpc.WorkerServiceStub) -> None:
        call = stub.Connect(metadata=self._metadata)
        reader: asyncio.Task[None] | None = None
        try:
            hello = worker_pb2.Hello()
            hello.CopyFrom(self.hello)
            hello.resume_from_seq = self.outbox.acked_seq
            await call.write(worker_pb2.WorkerMessage(seq=HELLO_SEQ, hello=hello))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                await _raise_status(call)  # the server refused the Hello
                return
            self._welcomed = True
            self._on_welcome(first.welcome)
            resend = self.outbox.resume(first.welcome.last_acked_seq)
            # NOTE: a server that refused a message names it in the next Welcome
            # (and in a Refused message before the status, when that gets
            # through): the status itself may arrive as INTERNAL, which is how
            # grpcio's asyncio client reports a write that raced the end of the call.
            w = first.welcome
            refused = w.refused_seq or self._refused_seq
            field = w.refused_field if w.refused_seq else self._refused_field
            self._refused_seq, self._refused_field = 0, ""
            drop, self._drop_first_resend = self._drop_first_resend or bool(refused), False
            if drop and resend and (not refused or resend[0].seq == refused):
                # what the server named leaves the message; the rest goes again
                self.stats.refused_messages += 1
                if self.outbox.trim_refused(resend[0].seq, field) is None:
                    resend = resend[1:]
            for msg in resend:
                await call.write(msg)
            self._connected.set()
            self.stats.connects += 1
            reader = asyncio.create_task(self._read(call))
            await self._write(call, reader)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            call.cancel()

    def _on_welcome(self, w: worker_pb2.Welcome) -> None:
        self.welcome = w
        self.leader_epoch = max(self.leader_epoch, w.leader_epoch)

    async def _write(self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None]) -> None:
        hb_interval_s = (
            self._heartbeat_override_s
            or (self.welcome.heartbeat_interval_s if self.welcome else 0.0)
            or 5.0
        )
        next_hb_s = self._clock()
        while True:
            if reader.done():
                reader.result()  # re-raise the read side's error
                raise _StreamEnded
            now = self._clock()
            if now >= next_hb_s:
                with self.pool_lock:
                    hb = self.pool.heartbeat(now)
                self.outbox.add_control(worker_pb2.WorkerMessage(heartbeat=hb))
                self.stats.heartbeats_sent += 1
                next_hb_s = now + hb_interval_s
            self._take_pool_events()
            if (
                self.outbox.pending_events()
                and self.outbox.pending_events() < self.outbox.max_batch_events
            ):
                await asyncio.sleep(self._max_batch_delay_s)  # let a batch fill up
                self._take_pool_events()
            for msg in self.outbox.frame():
                await call.write(msg)
            if self.outbox.has_pending():
                continue
            self._wake.clear()
            self._wake_armed = False
            if self.outbox.has_pending():
                continue
            timeout_s = max(0.0, next_hb_s - self._clock())
            waiter = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waiter, reader}, timeout=timeout_s, return_when="FIRST_COMPLETED")
            waiter.cancel()

    def _take_pool_events(self) -> None:
        if not self._collect_pool_events:
            return
        with self.pool_lock:
            events = self.pool.take_kv_events()
        ts_s = time.time()
        # Bounded batches keep every message far below gRPC's message size limit.
        for i in range(0, len(events), _MAX_KV_EVENTS_PER_BATCH):
            chunk = events[i : i + _MAX_KV_EVENTS_PER_BATCH]
            self.outbox.add_kv(types_pb2.KvEventBatch(ts_s=ts_s, events=chunk))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                await _raise_status(call)
                return
            body = msg.WhichOneof("body")
            if body == "ack":
                if self.outbox.ack(msg.ack.seq):
                    self._acked.set()
            elif body == "directive":
                self._on_directive(msg.directive)
            elif body == "batch":
                for d in msg.batch.directives:
                    self._on_directive(d)
                if msg.batch.ack_seq and self.outbox.ack(msg.batch.ack_seq):
                    self._acked.set()
            elif body == "resync":
                with self.pool_lock:
                    snap = self.pool.snapshot(self._clock())
                self.outbox.add_control(worker_pb2.WorkerMessage(pool_snapshot=snap))
                self.stats.snapshots_sent += 1
            elif body == "refused":
                self._refused_seq = msg.refused.seq
                self._refused_field = msg.refused.field
                log.warning(
                    "kvsched refused message seq %d: %s: %s",
                    msg.refused.seq,
                    msg.refused.field,
                    msg.refused.description,
                )
            elif body == "drain":
                self.drain = msg.drain
                self.worker_drained = self.worker_drained or msg.drain.worker_drained
                if self._on_drain is not None:
                    self._on_drain(msg.drain)
            elif body == "welcome":
                self._on_welcome(msg.welcome)
            self._poke()

    def _on_directive(self, d: worker_pb2.RetentionDirective) -> None:
        repeat = self._recent.get(d.directive_id)
        if repeat is not None:
            # Redelivered after a reconnect: answer again, apply once.
            self.stats.directives_repeated += 1
            self.outbox.add_control(worker_pb2.WorkerMessage(directive_ack=repeat))
            return
        if d.leader_epoch < self.leader_epoch:
            ack = worker_pb2.DirectiveAck(
                directive_id=d.directive_id,
                outcome=worker_pb2.DIRECTIVE_STALE_EPOCH,
                reason=f"leader epoch {d.leader_epoch} < {self.leader_epoch}",
            )
            self.stats.directives_stale += 1
        else:
            self.leader_epoch = d.leader_epoch
            with self.pool_lock:
                res = self.pool.apply_directive(d, self._clock())
            ack = worker_pb2.DirectiveAck(
                directive_id=d.directive_id,
                outcome=res.outcome,  # type: ignore[arg-type]
                reason=res.reason[:512],
            )
            if res.ok:
                self.stats.directives_applied += 1
            else:
                self.stats.directives_rejected += 1
        self._recent[d.directive_id] = ack
        while len(self._recent) > _RECENT_DIRECTIVES:
            self._recent.popitem(last=False)
        self.outbox.add_control(worker_pb2.WorkerMessage(directive_ack=ack))
        self._take_pool_events()

    async def _lease_timer(self) -> None:
        # NOTE: runs with or without a stream: a lease must end at its TTL even
        # when the scheduler that granted it is gone.
        while True:
            await asyncio.sleep(self._lease_check_interval_s)
            with self.pool_lock:
                self.stats.leases_expired += self.pool.expire_leases(self._clock())
            self._take_pool_events()
            if self.outbox.has_pending():
                self._poke()


class SyncWorkerClient:
    """Thread-friendly facade: runs a WorkerClient on its own loop in a daemon thread.

    For engines that are not asyncio. `report*` never block; the engine holds
    `pool_lock` whenever it touches the pool, since directives are applied to it
    from the client's thread.
    """

    def __init__(
        self, target: str, hello: worker_pb2.Hello, pool: KVPool, **kwargs: object
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvsched-worker", daemon=True
        )
        self._thread.start()

        async def build() -> WorkerClient:
            return WorkerClient(target, hello, pool, **kwargs)  # type: ignore[arg-type]

        self.client: WorkerClient = self._call(build(), timeout_s=5.0)
        self.pool_lock = self.client.pool_lock
        self.stats = self.client.stats

    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float | None) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self, connect_timeout_s: float = 0.0) -> bool:
        """Starts the client; waits up to `connect_timeout_s` for a stream."""
        self._call(self.client.start(), timeout_s=5.0)
        if connect_timeout_s <= 0:
            return self.client.connected
        return self._call(self.client.wait_connected(connect_timeout_s), None)

    def report(self, *events: types_pb2.SessionEvent) -> None:
        """Queues session events; never blocks."""
        self.client.report(*events)

    def report_kv_events(self, batch: types_pb2.KvEventBatch) -> None:
        """Queues one KV event batch; never blocks."""
        self.client.report_kv_events(batch)

    @property
    def connected(self) -> bool:
        """True while a stream is open and welcomed."""
        return self.client.connected

    def flush(self, timeout_s: float) -> bool:
        """Waits until everything reported is acked; returns False on timeout."""
        return self._call(self.client.flush(timeout_s), None)

    def stop(self, flush_timeout_s: float = 1.0) -> None:
        """Flushes (bounded), stops the client and its thread."""
        if not self._loop.is_running():
            return
        self._call(self.client.stop(flush_timeout_s), None)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()
