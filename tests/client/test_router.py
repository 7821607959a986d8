"""PlacementClient: the service's answer when it is fast, the fallback within the deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc
from kvsched_client.router import PlacementClient, SyncPlacementClient, rendezvous_order

LIVE = {f"w{i}": f"10.0.0.{i}:8000" for i in range(5)}


class FakePlacement(placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self) -> None:
        self.delay_s = 0.0
        self.calls = 0
        self.empty = False
        self.streams = 0
        self.fail_streams = 0  # the first N PlaceStreams end UNAVAILABLE at their first request
        self.refuse = 0  # google.rpc.Code to answer every stream request with, 0 = none

    def _answer(self, request) -> placement_pb2.PlaceResponse:
        if self.empty:
            return placement_pb2.PlaceResponse()
        return placement_pb2.PlaceResponse(
            candidates=[
                placement_pb2.PlacementCandidate(
                    worker_id="w9", endpoint="10.0.0.9:8000", kv_source_worker_id="w4"
                ),
                placement_pb2.PlacementCandidate(worker_id="w1", endpoint="10.0.0.1:8000"),
            ],
            step_priority=4,
            affinity_ttl_s=30.0,
            reason=f"affinity:{request.session_id}",
        )

    async def Place(self, request, context):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self._answer(request)

    async def PlaceStream(self, request_iterator, context):
        """Answers each request after `delay_s` (a session named slow-* waits 0.3 s
        more), concurrently, so answers come back out of order."""
        self.streams += 1
        out: asyncio.Queue = asyncio.Queue()

        async def answer(msg) -> None:
            extra = 0.3 if msg.request.session_id.startswith("slow") else 0.0
            await asyncio.sleep(self.delay_s + extra)
            if self.refuse:
                err = placement_pb2.PlaceError(code=self.refuse, message="no")
                await out.put(
                    placement_pb2.PlaceStreamResponse(request_id=msg.request_id, error=err)
                )
            else:
                placed = self._answer(msg.request)
                await out.put(
                    placement_pb2.PlaceStreamResponse(request_id=msg.request_id, placement=placed)
                )

        tasks: set[asyncio.Future] = set()

        async def read() -> None:
            async for msg in request_iterator:
                self.calls += 1
                if self.fail_streams:
                    self.fail_streams -= 1
                    await out.put(None)
                    return
                task = asyncio.ensure_future(answer(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        reader = asyncio.ensure_future(read())
        while (m := await out.get()) is not None:
            await context.write(m)
        reader.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "stream failed")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakePlacement, str]]:
    server = grpc.aio.server()
    servicer = FakePlacement()
    placement_pb2_grpc.add_PlacementServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


def req(session: str = "sess-1", **kw) -> placement_pb2.PlaceRequest:
    return placement_pb2.PlaceRequest(session_id=session, tenant_id="t", agent_type="a", **kw)


async def test_uses_the_service_answer_when_it_is_fast(fake) -> None:
    _servicer, target = fake
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, deadline_s=1.0, live_workers=LIVE)
        res = await client.place(req())
    assert (res.worker_ids, res.fell_back) == (("w9", "w1"), False)
    assert res.reason == "affinity:sess-1"
    assert (res.primary, res.step_priority, res.affinity_ttl_s) == ("w9", 4, 30.0)
    assert (res.kv_sources, res.primary_kv_source) == (("w4", ""), "w4")


async def test_slow_service_falls_back_within_the_deadline_then_cools_down(fake) -> None:
    servicer, target = fake
    servicer.delay_s = 0.5
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, live_workers=LIVE)  # default 10 ms
        await client.place(req("warm-up"))  # first call also opens the connection
        client._fb.skip_until_s = 0.0
        t0 = time.perf_counter()
        res = await client.place(req())
        elapsed_s = time.perf_counter() - t0
        assert elapsed_s < 0.1  # 10 ms deadline plus scheduling slack, far below 0.5 s
        assert res.fell_back and res.reason == "fallback:deadline"
        assert list(res.worker_ids) == rendezvous_order("sess-1", LIVE)[:3]
        assert res.endpoints[0] == LIVE[res.worker_ids[0]]
        calls = servicer.calls
        again = await client.place(req())
        assert again.reason == "fallback:cooldown" and servicer.calls == calls
        assert again.worker_ids == res.worker_ids  # affinity is stable
        assert client.fallbacks == 3


async def test_gone_service_falls_back_and_honours_candidates() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        client = PlacementClient(ch, deadline_s=0.05, live_workers=LIVE)
        res = await client.place(req(candidate_worker_ids=["w2", "w4", "gone"], max_candidates=5))
    assert res.fell_back and res.reason in ("fallback:unavailable", "fallback:deadline")
    assert set(res.worker_ids) == {"w2", "w4"}


async def test_empty_answer_falls_back(fake) -> None:
    servicer, target = fake
    servicer.empty = True
    async with grpc.aio.insecure_channel(target) as ch:
        res = await PlacementClient(ch, deadline_s=1.0, live_workers=LIVE).place(req())
    assert res.reason == "fallback:empty" and len(res.worker_ids) == 3


def test_sync_client_falls_back_within_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        client = SyncPlacementClient(ch, live_workers=LIVE)
        t0 = time.perf_counter()
        res = client.place(req())
        assert time.perf_counter() - t0 < 0.2
    assert res.fell_back and res.primary == rendezvous_order("sess-1", LIVE)[0]


def test_rendezvous_moves_only_the_sessions_of_a_removed_worker() -> None:
    sessions = [f"s{i}" for i in range(2000)]
    before = {s: rendezvous_order(s, LIVE)[0] for s in sessions}
    rest = [w for w in LIVE if w != "w3"]
    after = {s: rendezvous_order(s, rest)[0] for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(before[s] == "w3" for s in moved)
    assert 300 < len(moved) < 500  # about 1/5 of the sessions


async def test_stream_mode_matches_answers_to_concurrent_calls_by_request_id(fake) -> None:
    servicer, target = fake
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, deadline_s=2.0, live_workers=LIVE, stream=True)
        sessions = ["slow-a", "b", "slow-c", "d", "e"]
        results = await asyncio.gather(*(client.place(req(s)) for s in sessions))
        await client.close()
    # the slow ones were answered last, yet each call got its own answer
    assert [r.reason for r in results] == [f"affinity:{s}" for s in sessions]
    assert not any(r.fell_back for r in results)
    assert (servicer.streams, servicer.calls) == (1, 5)


async def test_stream_mode_falls_back_at_the_deadline_and_ignores_the_late_answer(fake) -> None:
    servicer, target = fake
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, deadline_s=0.1, cooldown_s=0.0, live_workers=LIVE, stream=True)
        await client.place(req("warm-up"))  # opens the stream
        t0 = time.perf_counter()
        res = await client.place(req("slow-x"))
        assert time.perf_counter() - t0 < 0.25
        assert res.reason == "fallback:deadline"
        # w9 joined the fallback's worker set with the warm-up's answer
        assert list(res.worker_ids) == rendezvous_order("slow-x", [*LIVE, "w9"])[:3]
        await asyncio.sleep(0.35)  # slow-x's answer arrives now, for nobody
        again = await client.place(req("y"))
        await client.close()
    assert (again.reason, again.fell_back) == ("affinity:y", False)
    assert servicer.streams == 1


async def test_stream_mode_refusals_and_a_failed_stream_fall_back_then_a_new_stream_opens(
    fake,
) -> None:
    servicer, target = fake
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, deadline_s=2.0, cooldown_s=0.0, live_workers=LIVE, stream=True)
        servicer.refuse = 8  # RESOURCE_EXHAUSTED
        refused = await client.place(req("r"))
        servicer.refuse = 0
        servicer.fail_streams = 1
        failed = await client.place(req("f"))
        recovered = await client.place(req("g"))
        await client.close()
    assert refused.reason == "fallback:resource_exhausted"
    assert failed.reason == "fallback:unavailable"
    assert (recovered.reason, servicer.streams, client.streams_opened) == ("affinity:g", 2, 2)
    # nothing of either stream is left feeding requests (grpc.aio leaves the feed of a
    # call that ended by itself waiting unless the client ends it)
    await asyncio.sleep(0.05)
    feeds = [t for t in asyncio.all_tasks() if "request_iterator" in repr(t.get_coro())]
    assert feeds == []


async def test_a_closed_stream_client_falls_back_and_opens_nothing(fake) -> None:
    servicer, target = fake
    async with grpc.aio.insecure_channel(target) as ch:
        client = PlacementClient(ch, deadline_s=2.0, live_workers=LIVE, stream=True)
        assert (await client.place(req("a"))).reason == "affinity:a"
        await client.close()
        after = await client.place(req("b"))
    assert after.reason == "fallback:closed"
    assert (servicer.streams, servicer.calls) == (1, 1)
