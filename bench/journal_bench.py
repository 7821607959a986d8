"""What durability costs: session events/s and ack latency with the SQLite journal on vs off.

Runs a real ``kvsched serve`` process twice (``--journal sqlite`` with
synchronous=FULL, then ``--journal memory``), each time driving ``--streams``
worker streams that keep ``--window`` batches of ``--batch`` events in flight
for ``--seconds``. Messages are pre-serialized so the client spends its CPU on
the wire, not on protobuf. Prints events/s acked, ack p50/p99 (HDR histograms)
and the ratio journal-on / journal-off measured in the same run.

Usage: python bench/journal_bench.py [--seconds 8] [--streams 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
from hdrh.histogram import HdrHistogram

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from loadtest.echo import varint as _varint
from loadtest.fleet import spawned_server

CONNECT = "/kvsched.v1.WorkerService/Connect"


def _bodies(worker: int, batch: int) -> tuple[bytes, bytes]:
    """Serialized WorkerMessage bodies (no seq): a STEP_START and a STEP_END batch."""
    out = []
    for kind in (types_pb2.STEP_START, types_pb2.STEP_END):
        events = [
            types_pb2.SessionEvent(
                event_id=f"e{worker}-{j}-{kind}",
                session_id=f"w{worker}-s{j}",
                tenant_id="bench",
                agent_type="swe-agent",
                step_index=1,
                kind=kind,
                context_tokens=2_000 + j,
                new_tokens=500,
            )
            for j in range(batch)
        ]
        out.append(
            worker_pb2.WorkerMessage(
                session_events=worker_pb2.SessionEventBatch(events=events)
            ).SerializeToString()
        )
    return out[0], out[1]


async def _stream(
    target: str,
    worker: int,
    batch: int,
    window: int,
    seconds: float,
    hist: HdrHistogram,
    counts: list[int],
    batches_per_s: float = 0.0,
) -> None:
    start_body, end_body = _bodies(worker, batch)
    hello = worker_pb2.WorkerMessage(
        seq=1,
        hello=worker_pb2.Hello(
            worker_id=f"bench-{worker}",
            epoch=int(time.time() * 1000),
            cache_spec=types_pb2.CacheSpec(
                block_size_tokens=16,
                bytes_per_token=131072,
                gpu_capacity_blocks=200_000,
                prefill_tokens_per_s=2e4,
            ),
        ),
    ).SerializeToString()
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    sent_at: dict[int, float] = {}

    async def gen() -> AsyncIterator[bytes]:
        while (m := await q.get()) is not None:
            yield m

    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream(
            CONNECT,
            request_serializer=None,
            response_deserializer=worker_pb2.ServerMessage.FromString,
        )(gen())
        await q.put(hello)
        await call.read()  # Welcome
        seq, acked = 1, 1
        deadline = time.perf_counter() + seconds
        # The first second warms caches and the allocator; it is not measured.
        measure_from = time.perf_counter() + min(1.0, seconds / 4)

        def send_one(intended: float | None = None) -> None:
            nonlocal seq
            seq += 1
            body = start_body if seq % 2 == 0 else end_body
            sent_at[seq] = time.perf_counter() if intended is None else intended
            q.put_nowait(b"\x08" + _varint(seq) + body)

        async def paced() -> None:
            # Open loop: batch i is due at t0 + i / rate whatever the server does;
            # latency counts from the due time, so stalls cannot hide.
            t0 = time.perf_counter()
            i = 0
            while (due := t0 + i / batches_per_s) < deadline:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                send_one(due)
                i += 1

        pacer = asyncio.create_task(paced()) if batches_per_s > 0 else None
        if pacer is None:
            for _ in range(window):
                send_one()
        while time.perf_counter() < deadline:
            try:
                # Paced runs go quiet once the last batch is acked: stop at the deadline.
                m = await asyncio.wait_for(call.read(), deadline - time.perf_counter() + 0.5)
            except TimeoutError:
                break
            if m is grpc.aio.EOF:
                break
            if m.WhichOneof("body") != "ack":
                continue
            now = time.perf_counter()
            for s in range(acked + 1, m.ack.seq + 1):
                t = sent_at.pop(s, None)
                if t is None:
                    continue
                if t >= measure_from:
                    hist.record_value(max(1, int((now - t) * 1e6)))
                    counts[0] += batch
                if pacer is None:
                    send_one()
            acked = max(acked, m.ack.seq)
        if pacer is not None:
            pacer.cancel()
        await q.put(None)
        call.cancel()


def _run_server(journal: str, args: argparse.Namespace) -> dict[str, float]:
    server_args = ["--journal", journal, "--snapshot-interval-s", "3600"]
    with spawned_server(server_args) as (target, _pid):
        hist = HdrHistogram(1, 60_000_000, 3)
        counts = [0]

        async def main() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(
                *(
                    _stream(
                        target,
                        w,
                        args.batch,
                        args.window,
                        args.seconds,
                        hist,
                        counts,
                        args.rate / args.batch / args.streams,
                    )
                    for w in range(args.streams)
                )
            )
            return time.perf_counter() - t0

        elapsed = asyncio.run(main())
    return {
        # Events acked that were sent after the warm-up, over the measured window.
        "events_per_s": round(counts[0] / max(1e-6, elapsed - min(1.0, args.seconds / 4))),
        "ack_p50_ms": hist.get_value_at_percentile(50) / 1000,
        "ack_p99_ms": hist.get_value_at_percentile(99) / 1000,
        "ack_p999_ms": hist.get_value_at_percentile(99.9) / 1000,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--window", type=int, default=8, help="unacked batches in flight per stream")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered events/s in total, open loop (0: saturate with --window)",
    )
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    on = _run_server("sqlite", ns)
    off = _run_server("memory", ns)
    result: dict[str, object] = {
        "journal_on": on,
        "journal_off": off,
        "throughput_ratio_on_vs_off": round(on["events_per_s"] / off["events_per_s"], 3),
        "streams": ns.streams,
        "batch_events": ns.batch,
        "window": ns.window,
    }
    if ns.json:
        print(json.dumps(result))
        return 0
    load = (
        f"open loop at {ns.rate:,.0f} events/s offered"
        if ns.rate > 0
        else f"{ns.window} batches in flight per stream (saturating)"
    )
    print(f"{ns.streams} streams, batches of {ns.batch} events, {load}, {ns.seconds}s each")
    for name, r in (("SQLite journal (FULL)", on), ("no journal (memory)", off)):
        print(
            f"  {name:<22} {r['events_per_s']:>9,} events/s   ack p50 {r['ack_p50_ms']:.2f} ms"
            f"   p99 {r['ack_p99_ms']:.2f} ms   p99.9 {r['ack_p999_ms']:.2f} ms"
        )
    print(f"  durability keeps {result['throughput_ratio_on_vs_off']:.0%} of the throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
