"""The vLLM KV-event bridge against a publisher that speaks vLLM's ZMQ protocol."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2  # noqa: E402
from kvsched_client.adapters.vllm_bridge import EventsOnlyPool, KvEventBridge  # noqa: E402
from kvsched_client.worker import WorkerClient  # noqa: E402

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Publisher:
    """vLLM's ZmqEventPublisher wire behaviour: PUB (topic, seq, payload) + ROUTER replay."""

    def __init__(self, ctx) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = ctx.socket(zmq.ROUTER)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.buffer: list[tuple[int, bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve_replay, daemon=True)
        self.thread.start()

    def publish(self, seq: int, ts: float, send: bool = True) -> None:
        batch = {"ts": ts, "events": [{"type": "BlockStored", "block_hashes": [seq], "parent_block_hash": None,
                 "token_ids": [1] * 16, "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}],
                 "data_parallel_rank": 1}  # fmt: skip
        payload = msgspec.msgpack.encode(batch)
        self.buffer.append((seq, payload))
        if send:
            self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(20):
                continue
            client_id, _, start = self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            for seq, buf in list(self.buffer):
                if seq >= start_seq:
                    self.router.send_multipart((client_id, b"", seq.to_bytes(8, "big"), buf))
            self.router.send_multipart((client_id, b"", END_SEQ, b""))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.pub.close(0)
        self.router.close(0)


@pytest.fixture
def publisher():
    ctx = zmq.Context()
    pub = Publisher(ctx)
    yield ctx, pub
    pub.close()
    ctx.term()


def _connect(ctx, pub, got) -> KvEventBridge:
    bridge = KvEventBridge(f"tcp://127.0.0.1:{pub.port}", got.append,
                           replay_endpoint=f"tcp://127.0.0.1:{pub.replay_port}", context=ctx)  # fmt: skip
    # PUB/SUB "slow joiner": wait until the subscription has reached the publisher.
    deadline = time.monotonic() + 3.0
    while not got and time.monotonic() < deadline:
        pub.publish(0, 0.0)
        bridge.poll(0.05)
    assert got, "subscription never joined"
    return bridge


def test_gaps_are_filled_from_the_replay_socket_in_order(publisher) -> None:
    ctx, pub = publisher
    got: list[types_pb2.KvEventBatch] = []
    bridge = _connect(ctx, pub, got)
    got.clear()
    base = bridge.last_seq + 1
    pub.publish(base, 1.0)
    pub.publish(base + 1, 2.0, send=False)  # lost on the PUB socket
    pub.publish(base + 2, 3.0, send=False)
    pub.publish(base + 3, 4.0)
    deadline = time.monotonic() + 3.0
    while len(got) < 4 and time.monotonic() < deadline:
        bridge.poll(0.05)
    assert [b.ts_s for b in got] == [1.0, 2.0, 3.0, 4.0]
    assert [b.events[0].stored.block_hashes[0].int64_hash for b in got] == [
        base + i for i in range(4)
    ]
    assert all(b.data_parallel_rank == 1 for b in got)
    assert (bridge.stats.gaps, bridge.stats.replayed, bridge.stats.lost) == (1, 2, 0)
    bridge.close()


async def test_bridge_feeds_a_worker_stream(publisher, fake_server) -> None:
    ctx, pub = publisher
    spec = types_pb2.CacheSpec(
        block_size_tokens=16, bytes_per_token=1, gpu_capacity_blocks=8, prefill_tokens_per_s=1.0
    )
    hello = worker_pb2.Hello(worker_id="vllm-0", epoch=1, engine_name="vllm")
    client = WorkerClient(
        fake_server.target,
        hello,
        EventsOnlyPool(spec),
        collect_pool_events=False,
        heartbeat_interval_s=60.0,
    )
    await client.start()
    assert await client.wait_connected(3.0)
    got: list[types_pb2.KvEventBatch] = []
    bridge = await asyncio.to_thread(_connect, ctx, pub, got)
    bridge._sink = client.report_kv_events
    pub.publish(bridge.last_seq + 1, 7.0)
    await asyncio.to_thread(bridge.poll, 1.0)
    assert await client.flush(3.0)
    kv = fake_server.fake.of("kv_events")
    assert [m.kv_events.ts_s for m in kv] == [7.0]
    bridge.close()
    await client.stop()
