"""WorkerService.Connect: one long-lived bidirectional stream per worker replica.

The reader task validates and applies each upstream message in order and hands
(seq, durable-future, decisions) to the acker; the acker waits for durability,
then sends a cumulative Ack and routes the decisions. The handler itself only
writes what the two produce, so a slow journal never reorders acks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
from opentelemetry import trace

from kvsched_client._proto.kvsched.v1 import worker_pb2, worker_pb2_grpc
from scheduler_service.api import convert, errors
from scheduler_service.api.auth import WORKERS, Authorizer, Principal, Role
from scheduler_service.api.dispatch import Applied, Dispatcher, StreamHandle
from scheduler_service.domain import Rejected, StaleEpoch, WorkerId

log = structlog.get_logger(__name__)
_tracer = trace.get_tracer(__name__)

#: Messages in flight per stream (applied, awaiting durability) before the reader
#: stops pulling from the socket; HTTP/2 flow control then slows the worker down.
MAX_IN_FLIGHT = 256
HEARTBEAT_INTERVAL_S = 5.0

_END = object()


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin: validate and convert (dispatcher), then stream acks and directives."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: Callable[[], float],
        server_id: str,
        authz: Authorizer,
    ) -> None:
        self._d = dispatcher
        self._clock = clock
        self._server_id = server_id
        self._authz = authz

    async def Connect(
        self,
        request_iterator: AsyncIterator[worker_pb2.WorkerMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_pb2.ServerMessage]:
        # NOTE: read the Hello before any refusal. Aborting while the client is
        # still writing its first message makes grpcio's client report INTERNAL
        # instead of our status; once the Hello is consumed the status arrives intact.
        first = await _next(request_iterator)
        if first is None:
            return
        principal = await self._authz.require(context, WORKERS, "WorkerService.Connect")
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        if self._d.overloaded():
            self._d.metrics.rejected.add(1, {"code": "RESOURCE_EXHAUSTED"})
            await errors.abort(
                context, errors.resource_exhausted("journal is behind; retry shortly", 0.5)
            )
        out: asyncio.Queue[object] = asyncio.Queue()
        handle = None
        try:
            if first.WhichOneof("body") != "hello":
                raise _Fail(errors.resync_required("the first message of a stream must be Hello"))
            now = self._clock()
            # Same worker, same epoch: a reconnect (our restart, or a network blip).
            # Its pool may have moved on while directives went undelivered, so ask
            # for a full inventory; the worker is the truth about residency.
            reconnect = self._d.engine.worker_epoch(WorkerId(first.hello.worker_id)) == (
                first.hello.epoch
            )
            await self._registered(context, principal, first.hello)
            spec, applied = self._d.hello(first.hello, now)
            await applied.durable
            handle = StreamHandle(
                worker_id=spec.worker_id,
                epoch=spec.epoch,
                send=out.put_nowait,
                close=lambda reason: out.put_nowait(errors.unavailable(reason, 0.1)),
            )
            self._d.attach(handle)
            self._d.route(applied.decisions)
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        except StaleEpoch as s:
            self._d.metrics.rejected.add(1, {"code": "FAILED_PRECONDITION"})
            await errors.abort(
                context, errors.resync_required(str(s), current_epoch=str(s.current))
            )
        except _Fail as f:
            await errors.abort(context, f.status)
        assert handle is not None
        bound = log.bind(worker=handle.worker_id, epoch=handle.epoch)
        bound.info("stream.open", resume_from_seq=first.hello.resume_from_seq)
        refused_seq, refused_field = self._d.refused_seq(handle.worker_id, handle.epoch)
        yield worker_pb2.ServerMessage(
            welcome=worker_pb2.Welcome(
                leader_epoch=self._d.engine.leader_epoch,
                last_acked_seq=self._d.last_acked_seq(handle.worker_id, handle.epoch),
                refused_seq=refused_seq,
                refused_field=refused_field,
                server_id=self._server_id,
                heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
            )
        )
        if reconnect:
            yield worker_pb2.ServerMessage(
                resync=worker_pb2.ResyncRequest(reason="reconnected; send a full PoolSnapshot")
            )
        span = _tracer.start_span(
            "kvsched.v1.WorkerService/Connect",
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "kvsched.worker_id": handle.worker_id,
                "kvsched.epoch": handle.epoch,
            },
        )
        acks: asyncio.Queue[object] = asyncio.Queue(maxsize=MAX_IN_FLIGHT)
        reader = asyncio.create_task(self._read(request_iterator, handle, acks, principal))
        acker = asyncio.create_task(self._ack(acks, out))
        batching = first.hello.accepts_server_batch
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                if isinstance(item, grpc.Status):
                    bound.info("stream.abort", code=item.code.name, details=item.details)
                    await errors.abort(context, item)
                assert isinstance(item, worker_pb2.ServerMessage)
                if batching and not out.empty() and item.WhichOneof("body") in _BATCHABLE:
                    item = _server_batch(item, out)
                yield item
        finally:
            reader.cancel()
            acker.cancel()
            fut = self._d.detach(handle, self._clock())
            if fut is not None:
                with contextlib.suppress(Exception):  # a failed journal already closed the stream
                    await asyncio.shield(fut)
            span.end()
            bound.info("stream.closed")

    async def _registered(
        self, context: grpc.aio.ServicerContext, p: Principal, hello: worker_pb2.Hello
    ) -> None:
        """A worker token may stream only for the worker ids it registered (first use binds)."""
        if p.role is not Role.WORKER:
            return
        try:
            worker_id = convert.hello_from_pb(hello).worker_id
        except Rejected:
            return  # the Hello itself is invalid; hello() reports which field

        bound = self._d.tokens.bound_to(worker_id)
        if bound is None:
            await self._d.bind_worker(p.token_id, worker_id, self._clock())
        elif bound != p.token_id:
            self._d.metrics.rejected.add(1, {"code": "PERMISSION_DENIED"})
            await errors.abort(
                context,
                errors.permission_denied(
                    f"hello.worker_id: {worker_id!r} is registered to another token"
                ),
            )

    async def _read(
        self,
        it: AsyncIterator[worker_pb2.WorkerMessage],
        handle: StreamHandle,
        acks: asyncio.Queue[object],
        principal: Principal,
    ) -> None:
        try:
            async for msg in it:
                if principal.tenant_id and (denied := _foreign_tenant(msg, principal)):
                    await acks.put(errors.permission_denied(f"{denied}: {principal.confinement()}"))
                    return
                try:
                    applied = self._d.worker_message(handle, msg, self._clock())
                except Rejected as r:
                    self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
                    self._d.refused(handle.worker_id, handle.epoch, msg.seq, r.field)
                    refused = worker_pb2.Refused(
                        seq=msg.seq, field=r.field, description=r.description
                    )
                    await acks.put(worker_pb2.ServerMessage(refused=refused))
                    await acks.put(errors.invalid_argument(r.field, r.description))
                    return
                await acks.put(_Pending(msg.seq, applied))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken transport: the stream is over
            log.info("stream.read_error", worker=handle.worker_id, error=repr(exc))
        await acks.put(_END)

    async def _ack(self, acks: asyncio.Queue[object], out: asyncio.Queue[object]) -> None:
        metrics = self._d.metrics
        while True:
            item = await acks.get()
            if isinstance(item, worker_pb2.ServerMessage):
                out.put_nowait(item)  # in order, after the acks of what came before
                continue
            if not isinstance(item, _Pending):
                out.put_nowait(item)
                return
            seq, applied = item.seq, item.applied
            try:
                await applied.durable
            except Exception as exc:
                log.error("journal.append_failed", error=repr(exc))
                out.put_nowait(
                    errors.unavailable("journal write failed; reconnect and resend", 1.0)
                )
                return
            # Coalesce: ack the newest message whose write is already durable.
            self._d.route(applied.decisions)
            while not acks.empty():
                nxt = acks._queue[0]  # type: ignore[attr-defined]
                if not isinstance(nxt, _Pending) or not nxt.applied.durable.done():
                    break
                acks.get_nowait()
                if nxt.applied.durable.exception() is not None:
                    out.put_nowait(errors.unavailable("journal write failed", 1.0))
                    return
                seq = nxt.seq
                self._d.route(nxt.applied.decisions)
            out.put_nowait(worker_pb2.ServerMessage(ack=worker_pb2.Ack(seq=seq)))
            metrics.acks.add(1)


_BATCHABLE = frozenset({"directive", "ack"})


def _server_batch(
    first: worker_pb2.ServerMessage, out: asyncio.Queue[object]
) -> worker_pb2.ServerMessage:
    """``first`` and the directives and acks queued right behind it, as one message.

    Stops at anything else (a status, a drain, the end), which stays queued.
    Acks are cumulative: the batch carries the highest.
    """
    batch = worker_pb2.ServerBatch()
    item = first
    while True:
        if item.WhichOneof("body") == "directive":
            batch.directives.append(item.directive)
        else:
            batch.ack_seq = max(batch.ack_seq, item.ack.seq)
        if out.empty():
            break
        nxt = out._queue[0]  # type: ignore[attr-defined]
        if (
            not isinstance(nxt, worker_pb2.ServerMessage)
            or nxt.WhichOneof("body") not in _BATCHABLE
        ):
            break
        out.get_nowait()
        item = nxt
    return worker_pb2.ServerMessage(batch=batch)


def _foreign_tenant(msg: worker_pb2.WorkerMessage, p: Principal) -> str | None:
    """The first field naming a tenant other than the token's, if any."""
    body = msg.WhichOneof("body")
    if body == "session_events":
        for i, ev in enumerate(msg.session_events.events):
            if ev.tenant_id != p.tenant_id:
                return f"session_events.events[{i}].tenant_id"
    elif body == "batch":
        for i, ev in enumerate(msg.batch.session_events):
            if ev.tenant_id != p.tenant_id:
                return f"batch.session_events[{i}].tenant_id"
    elif body == "pool_snapshot":
        for i, s in enumerate(msg.pool_snapshot.sessions):
            if s.tenant_id != p.tenant_id:
                return f"pool_snapshot.sessions[{i}].tenant_id"
    return None


@dataclass(frozen=True, slots=True)
class _Pending:
    """An applied message waiting for durability before its Ack."""

    seq: int
    applied: Applied


class _Fail(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


async def _next(it: AsyncIterator[worker_pb2.WorkerMessage]) -> worker_pb2.WorkerMessage | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None
