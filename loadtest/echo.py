"""Raw grpcio bidi echo/ack baseline: what grpcio itself does on this machine.

The server is a generic stream-stream handler on the same method name as the
worker stream; it reads each raw message, pulls its seq (field 1, a varint) and
answers an Ack{seq} — no parsing of the body, no engine, no journal. The
client drives it the way the load test drives kvsched: pre-serialized batches
of session events, a window of unacked batches per stream. The ratio of the two
event rates, measured in one run, says how much of grpcio's ceiling kvsched keeps.

The same server answers ``PlacementService/Place`` with one fixed, pre-serialized
PlaceResponse. ``place_client`` calls Place on an open-loop schedule (latency
from the intended send time) against either server, so kvsched's Place latency
at a rate can be read against what a unary grpcio call costs at that rate.

``python -m loadtest.echo --port N`` serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import grpc
from hdrh.histogram import HdrHistogram

from kvsched_client._proto.kvsched.v1 import placement_pb2, types_pb2, worker_pb2

__all__ = ["echo_client", "place_client", "serve_echo", "varint"]

METHOD = "/kvsched.v1.WorkerService/Connect"
PLACE_METHOD = "/kvsched.v1.PlacementService/Place"
_PLACE_REPLY = bytes(
    placement_pb2.PlaceResponse(
        candidates=[placement_pb2.PlacementCandidate(worker_id="echo-0")], reason="echo"
    ).SerializeToString()
)


def varint(n: int) -> bytes:
    """Protobuf base-128 varint encoding of ``n`` (for pre-serialized messages)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_seq(raw: bytes) -> int:
    """Returns field 1 (varint) of a message that starts with it, else 0."""
    if not raw or raw[0] != 0x08:
        return 0
    seq, shift = 0, 0
    for b in raw[1:11]:
        seq |= (b & 0x7F) << shift
        if b < 0x80:
            return seq
        shift += 7
    return 0


def _ack(seq: int) -> bytes:
    # ServerMessage.ack is field 2 in the wire contract; Ack.seq is field 1.
    return bytes(worker_pb2.ServerMessage(ack=worker_pb2.Ack(seq=seq)).SerializeToString())


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for raw in requests:
        yield _ack(_read_seq(raw))


async def _place_echo(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return _PLACE_REPLY


async def serve_echo(port: int) -> None:
    """Serves the echo methods on 127.0.0.1:`port` until cancelled or SIGTERM."""
    server = grpc.aio.server()
    handlers = (
        grpc.method_handlers_generic_handler(
            "kvsched.v1.WorkerService",
            {"Connect": grpc.stream_stream_rpc_method_handler(_echo)},
        ),
        grpc.method_handlers_generic_handler(
            "kvsched.v1.PlacementService",
            {"Place": grpc.unary_unary_rpc_method_handler(_place_echo)},
        ),
    )
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def batch_body(batch_events: int, stream: int) -> bytes:
    """A serialized WorkerMessage body (no seq) with `batch_events` session events."""
    events = [
        types_pb2.SessionEvent(
            event_id=f"echo-{stream}-{j}",
            session_id=f"echo-s{stream}-{j}",
            tenant_id="tenant-0",
            agent_type="coding",
            step_index=3,
            kind=types_pb2.STEP_START,
            context_tokens=40_000 + j,
            new_tokens=5_000,
        )
        for j in range(batch_events)
    ]
    msg = worker_pb2.WorkerMessage(session_events=worker_pb2.SessionEventBatch(events=events))
    return bytes(msg.SerializeToString())


def _hello(stream: int) -> bytes:
    hello = worker_pb2.Hello(
        worker_id=f"echo-{stream}-{time.time_ns()}",
        epoch=int(time.time() * 1000),
        cache_spec=types_pb2.CacheSpec(
            block_size_tokens=16,
            bytes_per_token=131_072,
            gpu_capacity_blocks=200_000,
            prefill_tokens_per_s=2e4,
        ),
    )
    return bytes(worker_pb2.WorkerMessage(seq=1, hello=hello).SerializeToString())


async def _one_stream(
    target: str,
    stream: int,
    batch_events: int,
    window: int,
    seconds: float,
    acked: list[int],
    with_hello: bool,
) -> None:
    body = batch_body(batch_events, stream)
    q: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def gen() -> AsyncIterator[bytes]:
        while (m := await q.get()) is not None:
            yield m

    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)(gen())
        seq = 0
        if with_hello:
            # A kvsched stream needs Hello (seq 1) and answers Welcome before any Ack.
            seq = 1
            await q.put(_hello(stream))
            await call.read()

        def send() -> None:
            nonlocal seq
            seq += 1
            q.put_nowait(b"\x08" + varint(seq) + body)

        last = seq
        for _ in range(window):
            send()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            m = await call.read()
            if m is grpc.aio.EOF:
                break
            msg = worker_pb2.ServerMessage.FromString(m)
            if msg.WhichOneof("body") != "ack":
                continue  # directives: not counted, not answered (a raw driver holds no pool)
            # Acks are cumulative: one may cover several batches.
            for _ in range(max(0, msg.ack.seq - last)):
                acked[0] += batch_events
                send()
            last = max(last, msg.ack.seq)
        await q.put(None)
        call.cancel()


async def echo_client(
    target: str,
    *,
    streams: int = 4,
    batch_events: int = 256,
    window: int = 8,
    seconds: float = 3.0,
    with_hello: bool = False,
) -> float:
    """Saturates `target` with pre-serialized batches; returns events/s acked.

    `with_hello` drives a real kvsched (Hello first) with the very same client,
    so the two rates differ only by what the server does.
    """
    acked = [0]
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _one_stream(target, i, batch_events, window, seconds, acked, with_hello)
            for i in range(streams)
        )
    )
    return acked[0] / (time.perf_counter() - t0)


async def place_client(
    target: str, *, rate_per_s: float, seconds: float, with_worker: bool = False
) -> dict[str, float]:
    """Place calls at `rate_per_s` for `seconds`; latency percentiles (ms) from the intended time.

    `with_worker` first opens one worker stream (Hello) and keeps it open, so a
    real kvsched has a live worker to place on; the echo needs none.
    """
    req = placement_pb2.PlaceRequest(
        session_id="echo-place",
        tenant_id="tenant-0",
        agent_type="coding",
        step_index=1,
        context_tokens=20_000,
        new_tokens=2_000,
    ).SerializeToString()
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stream = None
        if with_worker:
            hello = _hello(0)
            stream = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)(
                _hold_open(hello)
            )
            await stream.read()  # Welcome: the worker is live
        place = ch.unary_unary(PLACE_METHOD, request_serializer=None, response_deserializer=None)

        async def one(intended: float) -> None:
            try:
                await place(req, timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            hist.record_value(max(1, int((time.perf_counter() - intended) * 1e6)))

        tasks = []
        t0 = time.perf_counter()
        n = int(rate_per_s * seconds)
        for i in range(n):
            intended = t0 + i / rate_per_s
            wait = intended - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(intended)))
        await asyncio.gather(*tasks)
        if stream is not None:
            stream.cancel()
    return {
        "calls": float(hist.get_total_count()),
        "p50_ms": hist.get_value_at_percentile(50.0) / 1000.0,
        "p99_ms": hist.get_value_at_percentile(99.0) / 1000.0,
        "p999_ms": hist.get_value_at_percentile(99.9) / 1000.0,
        "errors": float(sum(errors.values())),
    }


async def _hold_open(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.Event().wait()  # until the call is cancelled


def main(argv: list[str] | None = None) -> int:
    """Runs the echo server (for a subprocess of the load test)."""
    p = argparse.ArgumentParser(prog="python -m loadtest.echo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    ns = p.parse_args(argv)
    asyncio.run(serve_echo(ns.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
