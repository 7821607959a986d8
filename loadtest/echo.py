"""Raw grpcio bidi echo/ack baseline: what grpcio itself does on this machine.

The server is a generic stream-stream handler on the same method name as the
worker stream; it reads each raw message, pulls its seq (field 1, a varint) and
answers an Ack{seq} — no parsing of the body, no engine, no journal. The
client drives it the way the load test drives kvsched: pre-serialized batches
of session events, a window of unacked batches per stream. The ratio of the two
event rates, measured in one run, says how much of grpcio's ceiling kvsched keeps.

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

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2

__all__ = ["echo_client", "serve_echo", "varint"]

METHOD = "/kvsched.v1.WorkerService/Connect"


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


async def serve_echo(port: int) -> None:
    """Serves the echo method on 127.0.0.1:`port` until cancelled or SIGTERM."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "kvsched.v1.WorkerService",
        {"Connect": grpc.stream_stream_rpc_method_handler(_echo)},
    )
    server.add_generic_rpc_handlers((handler,))
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


def main(argv: list[str] | None = None) -> int:
    """Runs the echo server (for a subprocess of the load test)."""
    p = argparse.ArgumentParser(prog="python -m loadtest.echo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    ns = p.parse_args(argv)
    asyncio.run(serve_echo(ns.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
