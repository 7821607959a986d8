"""A small in-process fake scheduler (WorkerService) for WorkerClient unit tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2, worker_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def by_kind(m: worker_pb2.WorkerMessage) -> list[worker_pb2.WorkerMessage]:
    """A WorkerBatch as the one-kind messages it replaces (same seq); others as they are."""
    if m.WhichOneof("body") != "batch":
        return [m]
    b = m.batch
    out = [worker_pb2.WorkerMessage(seq=m.seq, directive_ack=a) for a in b.directive_acks]
    if b.HasField("kv_events"):
        out.append(worker_pb2.WorkerMessage(seq=m.seq, kv_events=b.kv_events))
    if b.session_events:
        events = worker_pb2.SessionEventBatch(events=b.session_events)
        out.append(worker_pb2.WorkerMessage(seq=m.seq, session_events=events))
    return out


def session_events_of(m: worker_pb2.WorkerMessage) -> list[types_pb2.SessionEvent]:
    """The session events a message carries, whatever its framing."""
    return [e for v in by_kind(m) for e in v.session_events.events]


class FakeScheduler(worker_pb2_grpc.WorkerServiceServicer):
    """Acks what it receives (unless told not to), dedupes by seq, records everything."""

    def __init__(self) -> None:
        self.leader_epoch = 1
        self.ack = True
        self.hellos: list[worker_pb2.WorkerMessage] = []
        self.received: list[worker_pb2.WorkerMessage] = []  # every message, resends too
        self.applied: list[worker_pb2.WorkerMessage] = []  # first delivery of each seq
        self.last_seq = 0
        self.durable_seq = 0  # what an ack has promised
        self.refuse: Callable[[worker_pb2.WorkerMessage], bool] = lambda m: False
        # how a refusal ends the stream: a Refused message first (as kvsched
        # does), and the status code the client gets
        self.refused_message = False
        self.refuse_code = grpc.StatusCode.INVALID_ARGUMENT
        self.welcome_names_refused = False  # the next Welcome carries refused_seq
        self.refused_seq = 0
        self.refused_field = ""
        self.refuse_field: Callable[[worker_pb2.WorkerMessage], str] = lambda m: "f"
        self._down: asyncio.Queue[worker_pb2.ServerMessage | None] | None = None
        self.streams = 0
        self.changed = asyncio.Event()

    def send(self, msg: worker_pb2.ServerMessage) -> None:
        assert self._down is not None, "no open stream"
        self._down.put_nowait(msg)

    def end_stream(self) -> None:
        if self._down is not None:
            self._down.put_nowait(None)

    def crash(self) -> None:
        """Forgets what was applied but never made durable (never acked)."""
        self.applied = [m for m in self.applied if m.seq <= self.durable_seq]
        self.last_seq = self.durable_seq

    def of(self, body: str) -> list[worker_pb2.WorkerMessage]:
        """Applied messages of one kind; a WorkerBatch counts as one of each kind it holds."""
        return [v for m in self.applied for v in by_kind(m) if v.WhichOneof("body") == body]

    async def wait_for(self, pred: Callable[[], bool], timeout_s: float = 3.0) -> None:
        async def loop() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout_s)

    async def Connect(self, request_iterator, context):
        first = await request_iterator.__anext__()
        assert first.WhichOneof("body") == "hello" and first.seq == 1
        self.hellos.append(first)
        self.streams += 1
        down: asyncio.Queue[worker_pb2.ServerMessage | None] = asyncio.Queue()
        self._down = down
        self.changed.set()
        yield worker_pb2.ServerMessage(
            welcome=worker_pb2.Welcome(
                leader_epoch=self.leader_epoch,
                last_acked_seq=self.durable_seq,
                refused_seq=self.refused_seq if self.refused_seq > self.durable_seq else 0,
                refused_field=self.refused_field if self.refused_seq > self.durable_seq else "",
                server_id="fake",
                heartbeat_interval_s=5.0,
            )
        )

        async def read() -> None:
            async for m in request_iterator:
                if self.refuse(m):
                    field = self.refuse_field(m)
                    if self.welcome_names_refused:
                        self.refused_seq, self.refused_field = m.seq, field
                    if self.refused_message:
                        refused = worker_pb2.Refused(seq=m.seq, field=field, description="bad")
                        down.put_nowait(worker_pb2.ServerMessage(refused=refused))
                    down.put_nowait(None)
                    context.set_code(self.refuse_code)
                    return
                self.received.append(m)
                if m.seq > self.last_seq:
                    self.applied.append(m)
                    self.last_seq = m.seq
                if self.ack:
                    self.durable_seq = self.last_seq
                    down.put_nowait(worker_pb2.ServerMessage(ack=worker_pb2.Ack(seq=m.seq)))
                self.changed.set()
            down.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await down.get()) is not None:
                yield item
            if context.code() == self.refuse_code:
                await context.abort(self.refuse_code, "refused")
        finally:
            reader.cancel()
            if self._down is down:
                self._down = None


class FakeServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.fake = FakeScheduler()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.fake, self.server)
        self.server.add_insecure_port(self.target)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            self.fake.end_stream()
            await self.server.stop(0)
            self.server = None


@pytest.fixture
def dead_target() -> str:
    """A loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    srv = FakeServer(free_port())
    await srv.start()
    yield srv
    await srv.stop()
