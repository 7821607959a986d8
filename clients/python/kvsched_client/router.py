"""PlacementClient: Place with a deadline, failing open to rendezvous-hash affinity.

The router must never wait on the scheduler: each call carries a deadline
(10 ms by default), and on a timeout, an error or an empty answer the client
picks workers itself by rendezvous (highest-random-weight) hashing of the
session id over the live workers. The same session lands on the same worker
for as long as the worker set is stable, and only 1/N of sessions move when a
worker joins or leaves, so affinity (and the KV it keeps) survives an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc

__all__ = ["PlaceResult", "PlacementClient", "SyncPlacementClient", "rendezvous_order"]

DEFAULT_DEADLINE_S = 0.010
#: After a failure, calls skip the service for this long so an outage costs the
#: router one deadline, not one per request.
DEFAULT_COOLDOWN_S = 1.0


@dataclass(frozen=True, slots=True)
class PlaceResult:
    """Where to run a step: ordered worker ids (primary first) and how it was chosen."""

    worker_ids: tuple[str, ...]
    endpoints: tuple[str, ...]
    fell_back: bool
    # "affinity", "least_loaded", ... from the service, or "fallback:<why>".
    reason: str
    step_priority: int = 0
    affinity_ttl_s: float = 0.0
    # per candidate, the worker to load the session's KV from ("" = none): hand it
    # to the engine with the request (vLLM kv_transfer_params, an LMCache lookup)
    kv_sources: tuple[str, ...] = ()

    @property
    def primary(self) -> str | None:
        """Returns the primary worker id (None when no worker is live)."""
        return self.worker_ids[0] if self.worker_ids else None

    @property
    def primary_kv_source(self) -> str | None:
        """Where the primary should load the session's KV from, if anywhere."""
        return self.kv_sources[0] or None if self.kv_sources else None


def rendezvous_order(session_id: str, worker_ids: Iterable[str]) -> list[str]:
    """Returns the workers ordered by rendezvous weight for this session (best first)."""

    def weight(worker_id: str) -> tuple[bytes, str]:
        key = f"{session_id}\x00{worker_id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest(), worker_id

    return sorted(set(worker_ids), key=weight, reverse=True)


class _Fallback:
    """Live-worker registry and the fail-open decision, shared by both clients."""

    def __init__(
        self,
        live_workers: Mapping[str, str] | None,
        cooldown_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.live: dict[str, str] = dict(live_workers or {})  # worker id -> endpoint
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.skip_until_s = 0.0
        self.fallbacks = 0

    def should_skip(self) -> bool:
        return self.clock() < self.skip_until_s

    def result(self, request: placement_pb2.PlaceRequest, why: str) -> PlaceResult:
        self.fallbacks += 1
        pool: Iterable[str] = self.live.keys()
        if request.candidate_worker_ids:
            pool = [w for w in request.candidate_worker_ids if w in self.live]
        k = request.max_candidates or 3
        ids = tuple(rendezvous_order(request.session_id, pool)[:k])
        return PlaceResult(ids, tuple(self.live[w] for w in ids), True, f"fallback:{why}")

    def failed(self, why: str, request: placement_pb2.PlaceRequest) -> PlaceResult:
        self.skip_until_s = self.clock() + self.cooldown_s
        return self.result(request, why)

    def answer(
        self, request: placement_pb2.PlaceRequest, resp: placement_pb2.PlaceResponse
    ) -> PlaceResult:
        if not resp.candidates:
            return self.result(request, "empty")
        for c in resp.candidates:
            if c.endpoint:
                self.live.setdefault(c.worker_id, c.endpoint)
        return PlaceResult(
            tuple(c.worker_id for c in resp.candidates),
            tuple(c.endpoint for c in resp.candidates),
            False,
            resp.reason,
            resp.step_priority,
            resp.affinity_ttl_s,
            tuple(c.kv_source_worker_id for c in resp.candidates),
        )


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a router-role bearer token (`--auth token` servers)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


#: google.rpc.Code number -> the name a failed unary call reports ("resource_exhausted").
_CODE_NAMES = {c.value[0]: c.name.lower() for c in grpc.StatusCode}


def _why(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline"
    return code.name.lower() if code is not None else "error"


class _PlacementClientBase:
    """What the async and blocking clients share: stub, deadline, fallback, token."""

    def __init__(
        self,
        channel: grpc.Channel | grpc.aio.Channel,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        live_workers: Mapping[str, str] | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        self._stub = placement_pb2_grpc.PlacementServiceStub(channel)
        self.deadline_s = deadline_s
        self._fb = _Fallback(live_workers, cooldown_s, clock)
        self._metadata = _auth(token)

    def set_live_workers(self, live_workers: Mapping[str, str]) -> None:
        """Replaces the worker set the fallback chooses from (id -> endpoint)."""
        self._fb.live = dict(live_workers)

    @property
    def fallbacks(self) -> int:
        """Returns how many calls were answered by the fallback."""
        return self._fb.fallbacks


class PlacementClient(_PlacementClientBase):
    """Async Place with a deadline and a rendezvous-hash fallback.

    With ``stream=True`` the calls share one ``PlaceStream`` (opened on first
    use, reopened after it fails): far cheaper for the server than one unary
    call each when a router places many steps a second. Deadline, fallback and
    cooldown behave as for unary calls; call ``close()`` when done.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        live_workers: Mapping[str, str] | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
        stream: bool = False,
    ) -> None:
        super().__init__(
            channel,
            deadline_s=deadline_s,
            live_workers=live_workers,
            cooldown_s=cooldown_s,
            clock=clock,
            token=token,
        )
        self._stream = _PlaceStream(self._stub, self._metadata) if stream else None
        self._closed = False

    async def place(self, request: placement_pb2.PlaceRequest) -> PlaceResult:
        """Returns the service's placement, or the fallback's within the deadline."""
        if self._fb.should_skip():
            return self._fb.result(request, "cooldown")
        if self._stream is not None:
            if self._closed:
                return self._fb.result(request, "closed")
            return await self._place_on_stream(self._stream, request)
        try:
            resp = await self._stub.Place(request, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as err:
            return self._fb.failed(_why(err), request)
        return self._fb.answer(request, resp)

    async def _place_on_stream(
        self, stream: _PlaceStream, request: placement_pb2.PlaceRequest
    ) -> PlaceResult:
        try:
            async with asyncio.timeout(self.deadline_s):
                answer = await stream.call(request)
        except TimeoutError:
            return self._fb.failed("deadline", request)
        except grpc.RpcError as err:
            return self._fb.failed(_why(err), request)
        if answer.HasField("error"):
            return self._fb.failed(_CODE_NAMES.get(answer.error.code, "error"), request)
        return self._fb.answer(request, answer.placement)

    @property
    def streams_opened(self) -> int:
        """PlaceStreams opened so far (0 for unary calls)."""
        return self._stream.opened if self._stream is not None else 0

    async def close(self) -> None:
        """Ends the shared stream, if any, for good: later calls fall back ("closed").

        The channel stays the caller's.
        """
        self._closed = True
        if self._stream is not None:
            await self._stream.close()


_Item = tuple[placement_pb2.PlaceStreamRequest, "asyncio.Future[placement_pb2.PlaceStreamResponse]"]


@dataclass(slots=True)
class _OpenStream:
    """One PlaceStream call: what it still has to send, who waits on it, its reader."""

    outbox: asyncio.Queue[_Item | None]
    pending: dict[int, asyncio.Future[placement_pb2.PlaceStreamResponse]]
    reader: asyncio.Task[None] | None = None


class _PlaceStream:
    """One PlaceStream call shared by concurrent ``place`` calls, matched by request id."""

    def __init__(
        self,
        stub: placement_pb2_grpc.PlacementServiceStub,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._open: _OpenStream | None = None
        self._next_id = 0
        self.opened = 0  # streams opened so far

    async def call(self, request: placement_pb2.PlaceRequest) -> placement_pb2.PlaceStreamResponse:
        """Sends ``request`` and waits for its answer (the caller bounds the wait)."""
        st = self._open or self._start()
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[placement_pb2.PlaceStreamResponse] = (
            asyncio.get_running_loop().create_future()
        )
        st.pending[rid] = fut
        try:
            st.outbox.put_nowait(
                (placement_pb2.PlaceStreamRequest(request_id=rid, request=request), fut)
            )
            return await fut
        finally:
            st.pending.pop(rid, None)

    def _start(self) -> _OpenStream:
        outbox: asyncio.Queue[_Item | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[placement_pb2.PlaceStreamRequest]:
            while (item := await outbox.get()) is not None:
                msg, fut = item
                if not fut.done():  # its caller gave up (deadline): nobody wants the answer
                    yield msg

        call = self._stub.PlaceStream(requests(), metadata=self._metadata)
        st = _OpenStream(outbox, {})
        st.reader = asyncio.create_task(self._read(call, st))
        self._open = st
        self.opened += 1
        return st

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[
            placement_pb2.PlaceStreamRequest, placement_pb2.PlaceStreamResponse
        ],
        st: _OpenStream,
    ) -> None:
        failure: BaseException = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "the PlaceStream ended",
        )
        try:
            async for answer in call:
                fut = st.pending.get(answer.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except grpc.RpcError as err:
            failure = err
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            # the next call opens a new stream; whoever waited on this one fails over
            if self._open is st:
                self._open = None
            # NOTE: grpc.aio does not stop a request iterator when the call ends by
            # itself: without this it would wait on the queue forever.
            st.outbox.put_nowait(None)
            for fut in st.pending.values():
                if not fut.done():
                    fut.set_exception(failure)

    async def close(self) -> None:
        """Ends the stream and fails whatever still waits on it."""
        st, self._open = self._open, None
        if st is None:
            return
        st.outbox.put_nowait(None)
        if st.reader is not None:
            st.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await st.reader


class SyncPlacementClient(_PlacementClientBase):
    """Blocking twin of PlacementClient for routers that are not asyncio."""

    def place(self, request: placement_pb2.PlaceRequest) -> PlaceResult:
        """Returns the service's placement, or the fallback's within the deadline."""
        if self._fb.should_skip():
            return self._fb.result(request, "cooldown")
        try:
            resp = self._stub.Place(request, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as err:
            return self._fb.failed(_why(err), request)
        return self._fb.answer(request, resp)
