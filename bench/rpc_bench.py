"""Loopback round trips through a real ``kvsched serve`` process.

Measures, in one run against one server subprocess:
  * one batched SessionEventBatch message (``--batch`` events) sent on the worker
    stream until its Ack comes back (validation, engine, SQLite group commit, ack);
  * one Place call (unary, with a deadline);
  * a grpc.health.v1 Check on the same channel, as the raw-grpcio baseline.
Prints p50/p99 (HDR histograms) and the ratios to the baseline; ``--json`` prints one object.

Usage: python bench/rpc_bench.py [--n 2000] [--batch 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hdrh.histogram import HdrHistogram

from kvsched_client._proto.kvsched.v1 import (
    placement_pb2,
    placement_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from loadtest.fleet import spawned_server


def _summary(h: HdrHistogram) -> dict[str, float]:
    return {
        "p50_us": h.get_value_at_percentile(50),
        "p99_us": h.get_value_at_percentile(99),
        "p999_us": h.get_value_at_percentile(99.9),
        "mean_us": round(h.get_mean_value(), 1),
    }


async def _run(target: str, n: int, batch: int) -> dict[str, object]:
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(50):
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        q: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()

        async def gen() -> AsyncIterator[worker_pb2.WorkerMessage]:
            while True:
                yield await q.get()

        call = worker_pb2_grpc.WorkerServiceStub(ch).Connect(gen())
        await q.put(
            worker_pb2.WorkerMessage(
                seq=1,
                hello=worker_pb2.Hello(
                    worker_id="bench-w0",
                    epoch=int(time.time()),
                    endpoint="127.0.0.1:8000",
                    cache_spec=types_pb2.CacheSpec(
                        block_size_tokens=16,
                        bytes_per_token=131072,
                        gpu_capacity_blocks=26_000,
                        prefill_tokens_per_s=25_000,
                    ),
                ),
            )
        )
        await call.read()  # Welcome
        kinds = (types_pb2.STEP_START, types_pb2.STEP_END)
        ev_hist = HdrHistogram(1, 60_000_000, 3)
        for i in range(n + 50):
            events = [
                types_pb2.SessionEvent(
                    event_id=f"e{i}-{j}",
                    session_id=f"s{j}",
                    tenant_id="bench",
                    agent_type="swe-agent",
                    step_index=i,
                    kind=kinds[i % 2],
                    context_tokens=1000 + i,
                    new_tokens=10,
                )
                for j in range(batch)
            ]
            msg = worker_pb2.WorkerMessage(
                seq=i + 2, session_events=worker_pb2.SessionEventBatch(events=events)
            )
            t0 = time.perf_counter()
            await q.put(msg)
            while True:
                m = await call.read()
                if m.WhichOneof("body") == "ack" and m.ack.seq >= i + 2:
                    break
            if i >= 50:  # warm-up excluded
                ev_hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))

        place = placement_pb2_grpc.PlacementServiceStub(ch)
        pl_hist = HdrHistogram(1, 60_000_000, 3)
        base_hist = HdrHistogram(1, 60_000_000, 3)
        for i in range(n + 50):
            req = placement_pb2.PlaceRequest(
                session_id=f"s{i % batch}",
                tenant_id="bench",
                agent_type="swe-agent",
                step_index=1,
                context_tokens=2000,
            )
            t0 = time.perf_counter()
            await place.Place(req, timeout=0.05)
            t1 = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=0.05)
            t2 = time.perf_counter()
            if i >= 50:
                pl_hist.record_value(max(1, int((t1 - t0) * 1e6)))
                base_hist.record_value(max(1, int((t2 - t1) * 1e6)))
        call.cancel()
    ev, pl, base = _summary(ev_hist), _summary(pl_hist), _summary(base_hist)
    return {
        "n": n,
        "batch_events": batch,
        "event_batch_rtt": ev,
        "place_rtt": pl,
        "grpc_health_check_rtt": base,
        "event_batch_p50_vs_baseline": round(ev["p50_us"] / base["p50_us"], 2),
        "place_p50_vs_baseline": round(pl["p50_us"] / base["p50_us"], 2),
        "events_per_s_sequential": round(batch / (ev["mean_us"] / 1e6)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    with spawned_server([]) as (target, _pid):
        result = asyncio.run(_run(target, ns.n, ns.batch))
    if ns.json:
        print(json.dumps(result))
        return 0
    print(f"loopback round trips, n={ns.n} (server: real process, SQLite journal, FULL sync)")
    for key, label in (
        ("event_batch_rtt", f"event batch ({ns.batch} events) -> Ack"),
        ("place_rtt", "Place"),
        ("grpc_health_check_rtt", "health Check (baseline)"),
    ):
        s = result[key]
        assert isinstance(s, dict)
        print(
            f"  {label:<36} p50 {s['p50_us']:>7} us   p99 {s['p99_us']:>7} us   p99.9 {s['p999_us']:>7} us"
        )
    print(
        f"  event batch p50 / baseline p50 = {result['event_batch_p50_vs_baseline']}x;"
        f" Place p50 / baseline p50 = {result['place_p50_vs_baseline']}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
