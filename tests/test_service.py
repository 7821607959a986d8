"""End-to-end behaviour of the service on a real loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from kvsched_client._proto.kvsched.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from scheduler_service.config import ServeConfig
from scheduler_service.server import Service

K = types_pb2.SessionEventKind


def hello(
    worker_id: str = "w1", epoch: int = 1, resume: int = 0, seq: int = 1, kv_domain: str = ""
) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(
        seq=seq,
        hello=worker_pb2.Hello(
            worker_id=worker_id,
            epoch=epoch,
            endpoint=f"{worker_id}:8000",
            engine_name="reference",
            model="llama-3.1-8b",
            cache_spec=types_pb2.CacheSpec(
                block_size_tokens=16,
                bytes_per_token=131072,
                gpu_capacity_blocks=26_000,
                host_capacity_blocks=50_000,
                hash_algo="sha256",
                prefill_tokens_per_s=25_000,
                host_link_bytes_per_s=25e9,
                kv_transfer_domain=kv_domain,
            ),
            resume_from_seq=resume,
        ),
    )


def event(
    sid: str, kind: int, step: int = 0, ctx: int = 1000, eid: str | None = None, tool: str = ""
) -> types_pb2.SessionEvent:
    return types_pb2.SessionEvent(
        event_id=eid or f"{sid}-{step}-{kind}",
        session_id=sid,
        tenant_id="acme",
        agent_type="swe-agent",
        step_index=step,
        kind=kind,  # type: ignore[arg-type]
        context_tokens=ctx,
        new_tokens=100,
        tool_name=tool,
    )


def batch(seq: int, *events: types_pb2.SessionEvent) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(
        seq=seq, session_events=worker_pb2.SessionEventBatch(events=list(events))
    )


class Stream:
    """A worker stream driven message by message from a test."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._q: asyncio.Queue[worker_pb2.WorkerMessage | None] = asyncio.Queue()
        self.call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(self._gen())

    async def _gen(self) -> AsyncIterator[worker_pb2.WorkerMessage]:
        while (m := await self._q.get()) is not None:
            yield m

    async def send(self, *msgs: worker_pb2.WorkerMessage) -> None:
        for m in msgs:
            await self._q.put(m)

    async def close(self) -> None:
        await self._q.put(None)

    async def recv(self, timeout: float = 5.0) -> worker_pb2.ServerMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        assert msg is not grpc.aio.EOF, "stream ended"
        return msg

    async def recv_until_ack(self, seq: int) -> list[worker_pb2.ServerMessage]:
        got = []
        while True:
            m = await self.recv()
            got.append(m)
            if m.WhichOneof("body") == "ack" and m.ack.seq >= seq:
                return got


async def connect(channel: grpc.aio.Channel, **kw: int | str) -> tuple[Stream, worker_pb2.Welcome]:
    s = Stream(channel)
    await s.send(hello(**kw))  # type: ignore[arg-type]
    first = await s.recv()
    assert first.WhichOneof("body") == "welcome"
    return s, first.welcome


def field_violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    out = []
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out.extend(v.field for v in br.field_violations)
    return out


def retry_delay_s(err: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay the error carries (fails the test when it carries none)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    retry = error_details_pb2.RetryInfo()
    assert status is not None and status.details[0].Unpack(retry), "no RetryInfo"
    return float(retry.retry_delay.ToNanoseconds()) / 1e9


async def stats(channel: grpc.aio.Channel) -> admin_pb2.ClusterStats:
    return await admin_pb2_grpc.AdminServiceStub(channel).GetClusterStats(
        admin_pb2.GetClusterStatsRequest()
    )


# -- the stream -----------------------------------------------------------------------------


async def test_hello_then_batches_are_acked_in_order(channel: grpc.aio.Channel) -> None:
    s, welcome = await connect(channel)
    assert welcome.leader_epoch == 1 and welcome.last_acked_seq == 0
    await s.send(
        batch(2, event("s1", K.STEP_START), event("s2", K.STEP_START)),
        batch(3, event("s1", K.STEP_END, ctx=1500)),
        batch(4, event("s1", K.TOOL_CALL_WAIT, ctx=1500, tool="pytest")),
    )
    acks = [m.ack.seq for m in await s.recv_until_ack(4) if m.WhichOneof("body") == "ack"]
    assert acks == sorted(acks) and acks[-1] == 4
    st = await stats(channel)
    assert st.events_total == 4
    assert st.sessions_tool_wait == 1 and st.sessions_running == 1
    await s.close()


async def test_tool_wait_sends_a_retain_lease_with_ttl(channel: grpc.aio.Channel) -> None:
    s, _ = await connect(channel)
    await s.send(
        batch(
            2,
            event("s1", K.STEP_START),
            event("s1", K.STEP_END, ctx=1200),
            event("s1", K.TOOL_CALL_WAIT, ctx=1200, tool="pytest"),
        )
    )
    got = await s.recv_until_ack(2)
    directives = [m.directive for m in got if m.WhichOneof("body") == "directive"]
    assert [d.session_id for d in directives] == ["s1"]
    d = directives[0]
    assert d.action == worker_pb2.RETAIN_GPU and d.lease_ttl_s > 0 and d.leader_epoch == 1
    await s.close()


async def test_resent_messages_are_acked_but_applied_once(channel: grpc.aio.Channel) -> None:
    s, _ = await connect(channel)
    await s.send(batch(2, event("s1", K.STEP_START)), batch(3, event("s2", K.STEP_START)))
    await s.recv_until_ack(3)
    await s.close()
    await asyncio.sleep(0.05)
    s2, welcome = await connect(channel, resume=3)
    assert welcome.last_acked_seq == 3
    await s2.send(
        batch(2, event("s1", K.STEP_START)),
        batch(3, event("s2", K.STEP_START)),
        batch(4, event("s3", K.STEP_START)),
    )
    await s2.recv_until_ack(4)
    st = await stats(channel)
    assert st.events_total == 3 and st.sessions_running == 3
    await s2.close()


async def test_stream_without_hello_is_resync_required(channel: grpc.aio.Channel) -> None:
    s = Stream(channel)
    await s.send(batch(1, event("s1", K.STEP_START)))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await s.recv()
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(ei.value)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "RESYNC_REQUIRED"


async def test_stale_epoch_is_resync_required(channel: grpc.aio.Channel) -> None:
    s, _ = await connect(channel, epoch=5)
    await s.close()
    old = Stream(channel)
    await old.send(hello(epoch=4))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await old.recv()
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 5" in (ei.value.details() or "")


BAD_STREAM_MESSAGES: Sequence[tuple[str, worker_pb2.WorkerMessage]] = (
    ("session_events.events[0].context_tokens", batch(2, event("x", K.STEP_START, ctx=(1 << 40)))),
    ("session_events.events[1].kind", batch(2, event("x", K.STEP_START), event("x", 99))),
    ("session_events.events[0].session_id", batch(2, event("", K.STEP_START))),
    ("session_events.events[0].session_id", batch(2, event("never-started", K.TOOL_CALL_END))),
    ("session_events.events", batch(2)),
    ("seq", batch(1, event("x", K.STEP_START))),
    ("hello", hello(seq=2)),
    ("body", worker_pb2.WorkerMessage(seq=2)),
    (
        "kv_events.events[0].stored.block_hashes[0].digest",
        worker_pb2.WorkerMessage(
            seq=2,
            kv_events=types_pb2.KvEventBatch(
                events=[
                    types_pb2.KvEvent(
                        stored=types_pb2.BlockStored(
                            block_hashes=[types_pb2.BlockHash(digest=b"x" * 65)],
                            tier=types_pb2.TIER_GPU,
                        )
                    )
                ]
            ),
        ),
    ),
    ("batch", worker_pb2.WorkerMessage(seq=2, batch=worker_pb2.WorkerBatch())),
    (
        "batch.session_events[0].session_id",
        worker_pb2.WorkerMessage(
            seq=2,
            batch=worker_pb2.WorkerBatch(
                kv_events=types_pb2.KvEventBatch(
                    events=[
                        types_pb2.KvEvent(
                            stored=types_pb2.BlockStored(
                                block_hashes=[types_pb2.BlockHash(uint64_hash=9)],
                                tier=types_pb2.TIER_GPU,
                            )
                        )
                    ]
                ),
                session_events=[event("ghost", K.TOOL_CALL_END)],
            ),
        ),
    ),
    (
        "batch.session_events[1].session_id",
        worker_pb2.WorkerMessage(
            seq=2,
            batch=worker_pb2.WorkerBatch(
                session_events=[event("x", K.STEP_START), event("ghost", K.TOOL_CALL_END)]
            ),
        ),
    ),
    (
        "batch.directive_acks[0].outcome",
        worker_pb2.WorkerMessage(
            seq=2,
            batch=worker_pb2.WorkerBatch(
                directive_acks=[worker_pb2.DirectiveAck(directive_id="d", outcome=99)],  # type: ignore[arg-type]
                session_events=[event("x", K.STEP_START)],
            ),
        ),
    ),
    (
        "heartbeat.gpu_free_blocks",
        worker_pb2.WorkerMessage(seq=2, heartbeat=worker_pb2.Heartbeat(gpu_free_blocks=1 << 41)),
    ),
)


def _stored(*hashes: int) -> types_pb2.KvEventBatch:
    stored = types_pb2.BlockStored(
        block_hashes=[types_pb2.BlockHash(uint64_hash=h) for h in hashes], tier=types_pb2.TIER_GPU
    )
    return types_pb2.KvEventBatch(events=[types_pb2.KvEvent(stored=stored)])


async def _gpu_used(channel: grpc.aio.Channel, worker_id: str) -> int:
    workers = await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(
        admin_pb2.ListWorkersRequest()
    )
    [w] = [w for w in workers.workers if w.worker_id == worker_id]
    return int(w.gpu_used_blocks)


async def test_a_worker_batch_applies_answers_kv_events_and_session_events_as_one_message(
    channel: grpc.aio.Channel,
) -> None:
    s, _ = await connect(channel)
    await s.send(batch(2, event("s1", K.STEP_START, ctx=16_000)))
    await s.recv_until_ack(2)
    await s.send(batch(3, event("s1", K.TOOL_CALL_WAIT, ctx=16_000, tool="bash")))
    got = await s.recv_until_ack(3)
    [directive] = [m.directive for m in got if m.WhichOneof("body") == "directive"]
    assert directive.action == worker_pb2.RETAIN_GPU
    used = await _gpu_used(channel, "w1")
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    leased = await admin.GetSession(admin_pb2.GetSessionRequest(session_id="s1"))
    assert leased.lease_remaining_s > 0
    # the pool could not hold the lease, and stored three blocks: one message
    answer = worker_pb2.DirectiveAck(
        directive_id=directive.directive_id,
        outcome=worker_pb2.DIRECTIVE_REJECTED,
        reason="pool full",
    )
    await s.send(
        worker_pb2.WorkerMessage(
            seq=4,
            batch=worker_pb2.WorkerBatch(directive_acks=[answer], kv_events=_stored(1, 2, 3)),
        )
    )
    assert [m.ack.seq for m in await s.recv_until_ack(4) if m.WhichOneof("body") == "ack"] == [4]
    view = await admin.GetSession(admin_pb2.GetSessionRequest(session_id="s1"))
    assert view.lease_remaining_s == 0.0  # the engine knows the lease never took
    assert await _gpu_used(channel, "w1") == used + 3
    await s.send(
        worker_pb2.WorkerMessage(
            seq=5,
            batch=worker_pb2.WorkerBatch(
                session_events=[
                    event("s1", K.TOOL_CALL_END, ctx=16_000),
                    event("s1", K.STEP_START, step=1, ctx=16_100),
                ],
            ),
        )
    )
    await s.recv_until_ack(5)
    after = await stats(channel)
    assert after.events_total == 4 and after.sessions_running == 1
    await s.close()


@pytest.mark.parametrize(
    ("field", "msg"), BAD_STREAM_MESSAGES, ids=[f for f, _ in BAD_STREAM_MESSAGES]
)
async def test_bad_stream_input_is_invalid_argument_and_changes_nothing(
    channel: grpc.aio.Channel, field: str, msg: worker_pb2.WorkerMessage
) -> None:
    s, _ = await connect(channel)
    await s.send(
        batch(1 if field == "seq" else 2, event("keep", K.STEP_START))
        if field == "seq"
        else batch(1, event("keep", K.STEP_START))
    )
    before = await stats(channel)
    used = await _gpu_used(channel, "w1")
    await s.send(msg)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        while True:
            got.append(await s.recv())
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(ei.value) == [field]
    # the refused message is named in the stream too, just before the status
    refused = [m.refused for m in got if m.WhichOneof("body") == "refused"]
    assert [(r.seq, r.field) for r in refused] == [(msg.seq, field)]
    assert await _gpu_used(channel, "w1") == used  # no part of a rejected batch applied
    after = await stats(channel)
    assert after.events_total == before.events_total
    assert (after.sessions_running, after.sessions_idle, after.sessions_tool_wait) == (
        before.sessions_running,
        before.sessions_idle,
        before.sessions_tool_wait,
    )


async def test_the_next_welcome_names_the_refused_message_until_the_worker_moves_past_it(
    channel: grpc.aio.Channel,
) -> None:
    s, first = await connect(channel, epoch=3)
    assert first.refused_seq == 0
    await s.send(batch(2, event("ghost", K.TOOL_CALL_END)))
    with pytest.raises(grpc.aio.AioRpcError):
        while True:
            await s.recv()
    again, welcome = await connect(channel, epoch=3)
    assert (welcome.last_acked_seq, welcome.refused_seq) == (0, 2)
    assert welcome.refused_field == "session_events.events[0].session_id"
    await again.send(batch(3, event("s1", K.STEP_START)))  # the worker skipped seq 2
    await again.recv_until_ack(3)
    await again.close()
    _, later = await connect(channel, epoch=3)
    assert (later.last_acked_seq, later.refused_seq) == (3, 0)


BAD_HELLOS = (
    ("hello.worker_id", {"worker_id": ""}),
    ("hello.epoch", {"epoch": 0}),
)


@pytest.mark.parametrize(("field", "kw"), BAD_HELLOS, ids=[f for f, _ in BAD_HELLOS])
async def test_bad_hello_is_invalid_argument(
    channel: grpc.aio.Channel, field: str, kw: dict[str, object]
) -> None:
    s = Stream(channel)
    await s.send(hello(**kw))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await s.recv()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(ei.value) == [field]
    workers = await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(
        admin_pb2.ListWorkersRequest()
    )
    assert list(workers.workers) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("prefill_tokens_per_s", float("nan")), ("kv_transfer_domain", "n" * 300)],
)
async def test_bad_cache_spec_names_the_field(
    channel: grpc.aio.Channel, field: str, value: object
) -> None:
    msg = hello()
    setattr(msg.hello.cache_spec, field, value)
    s = Stream(channel)
    await s.send(msg)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await s.recv()
    assert field_violations(ei.value) == [f"hello.cache_spec.{field}"]


# -- placement ------------------------------------------------------------------------------


@pytest.mark.parametrize("accepts", [True, False])
async def test_directives_and_their_ack_come_as_one_server_batch_when_the_worker_accepts_it(
    channel: grpc.aio.Channel, accepts: bool
) -> None:
    s = Stream(channel)
    h = hello()
    h.hello.accepts_server_batch = accepts
    await s.send(h)
    assert (await s.recv()).WhichOneof("body") == "welcome"
    sids = ("a", "b", "c")
    await s.send(batch(2, *(event(sid, K.STEP_START, ctx=16_000) for sid in sids)))
    await s.recv_until_ack(2)
    # three tool waits in one message: three leases, then the ack of seq 3
    await s.send(batch(3, *(event(sid, K.TOOL_CALL_WAIT, ctx=16_000, tool="bash") for sid in sids)))
    got = []
    while not got or got[-1].WhichOneof("body") not in {"ack", "batch"}:
        got.append(await s.recv())
    if accepts:
        [only] = got
        assert only.WhichOneof("body") == "batch"
        assert only.batch.ack_seq == 3
        assert [d.session_id for d in only.batch.directives] == list(sids)
        assert {d.action for d in only.batch.directives} == {worker_pb2.RETAIN_GPU}
    else:
        assert [m.WhichOneof("body") for m in got] == ["directive"] * 3 + ["ack"]
        assert got[-1].ack.seq == 3
    await s.close()


async def test_place_prefers_the_worker_holding_the_session(channel: grpc.aio.Channel) -> None:
    a, _ = await connect(channel, worker_id="wa")
    b, _ = await connect(channel, worker_id="wb")
    await b.send(batch(2, event("s1", K.STEP_START, ctx=8000), event("s1", K.STEP_END, ctx=8000)))
    await b.recv_until_ack(2)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    resp = await stub.Place(
        placement_pb2.PlaceRequest(
            session_id="s1",
            tenant_id="acme",
            agent_type="swe-agent",
            step_index=1,
            context_tokens=9000,
            max_candidates=2,
        ),
        timeout=1.0,
    )
    assert [c.worker_id for c in resp.candidates] == ["wb", "wa"]
    assert resp.candidates[0].expected_cached_tokens > 0
    assert resp.affinity_ttl_s > 0
    await a.close()
    await b.close()


async def test_place_scores_the_prompt_prefix_a_worker_reported_in_kv_events(
    channel: grpc.aio.Channel,
) -> None:
    a, _ = await connect(channel, worker_id="wa")
    b, _ = await connect(channel, worker_id="wb")
    prompt = [types_pb2.BlockHash(digest=bytes([i]) * 32) for i in range(1, 201)]  # 3,200 tokens
    stored = types_pb2.KvEvent(
        stored=types_pb2.BlockStored(block_hashes=prompt, tier=types_pb2.TIER_GPU)
    )
    await b.send(worker_pb2.WorkerMessage(seq=2, kv_events=types_pb2.KvEventBatch(events=[stored])))
    await b.recv_until_ack(2)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    resp = await stub.Place(
        placement_pb2.PlaceRequest(
            session_id="fresh",
            tenant_id="acme",
            agent_type="swe-agent",
            context_tokens=4000,
            max_candidates=2,
            prefix_block_hashes=prompt,
        ),
        timeout=1.0,
    )
    assert resp.reason == "prefix"
    assert [(c.worker_id, c.expected_cached_tokens) for c in resp.candidates] == [
        ("wb", 3200),
        ("wa", 0),
    ]
    await a.close()
    await b.close()


async def test_place_names_where_a_moved_step_loads_its_kv_from(
    channel: grpc.aio.Channel,
) -> None:
    a, _ = await connect(channel, worker_id="wa", kv_domain="node-0")
    b, _ = await connect(channel, worker_id="wb", kv_domain="node-0")
    await a.send(
        batch(2, event("s1", K.STEP_START, ctx=64_000), event("s1", K.STEP_END, ctx=64_000))
    )
    await a.recv_until_ack(2)
    beat = worker_pb2.Heartbeat(gpu_free_blocks=20_000, queued_prefill_tokens=300_000)
    await a.send(worker_pb2.WorkerMessage(seq=3, heartbeat=beat))  # a 12 s queue
    await a.recv_until_ack(3)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    resp = await stub.Place(
        placement_pb2.PlaceRequest(
            session_id="s1", tenant_id="acme", step_index=1, context_tokens=64_000
        ),
        timeout=1.0,
    )
    assert resp.reason == "move"
    first = resp.candidates[0]
    assert (first.worker_id, first.kv_source_worker_id) == ("wb", "wa")
    assert (first.expected_cached_tokens, first.cached_tier) == (64_000, types_pb2.TIER_UNSPECIFIED)
    assert [c.kv_source_worker_id for c in resp.candidates[1:]] == [""]
    await a.close()
    await b.close()


async def test_place_with_no_worker_is_unavailable(channel: grpc.aio.Channel) -> None:
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Place(placement_pb2.PlaceRequest(session_id="s", tenant_id="t"), timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("field", "req"),
    [
        ("session_id", placement_pb2.PlaceRequest(tenant_id="t")),
        ("tenant_id", placement_pb2.PlaceRequest(session_id="s")),
        (
            "max_candidates",
            placement_pb2.PlaceRequest(session_id="s", tenant_id="t", max_candidates=99),
        ),
        (
            "context_tokens",
            placement_pb2.PlaceRequest(session_id="s", tenant_id="t", context_tokens=1 << 50),
        ),
    ],
)
async def test_bad_place_is_invalid_argument(
    channel: grpc.aio.Channel, field: str, req: placement_pb2.PlaceRequest
) -> None:
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Place(req, timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(ei.value) == [field]


async def test_place_stream_answers_by_request_id_and_keeps_refusals_on_the_stream(
    channel: grpc.aio.Channel,
) -> None:
    a, _ = await connect(channel, worker_id="wa")
    b, _ = await connect(channel, worker_id="wb")
    await b.send(batch(2, event("s1", K.STEP_START, ctx=8000), event("s1", K.STEP_END, ctx=8000)))
    await b.recv_until_ack(2)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    good = placement_pb2.PlaceRequest(
        session_id="s1", tenant_id="acme", step_index=1, context_tokens=9000, max_candidates=2
    )
    bad = placement_pb2.PlaceRequest(session_id="s1", tenant_id="acme", max_candidates=99)
    unary = await stub.Place(good, timeout=1.0)
    call = stub.PlaceStream()
    for rid, req in ((7, good), (8, bad), (9, good)):
        await call.write(placement_pb2.PlaceStreamRequest(request_id=rid, request=req))
    answers = [await asyncio.wait_for(call.read(), 2.0) for _ in range(3)]
    await call.done_writing()
    assert [m.request_id for m in answers] == [7, 8, 9]
    assert answers[0].WhichOneof("result") == answers[2].WhichOneof("result") == "placement"
    assert [c.worker_id for c in answers[0].placement.candidates] == ["wb", "wa"]
    assert [c.worker_id for c in answers[0].placement.candidates] == [
        c.worker_id for c in unary.candidates
    ]
    err = answers[1].error
    assert (err.code, err.field) == (code_pb2.INVALID_ARGUMENT, "request.max_candidates")
    assert "max_candidates" in err.message
    assert await call.read() is grpc.aio.EOF  # ended cleanly, by the client
    await a.close()
    await b.close()


async def test_place_stream_with_no_worker_answers_unavailable_with_a_retry_delay(
    channel: grpc.aio.Channel,
) -> None:
    call = placement_pb2_grpc.PlacementServiceStub(channel).PlaceStream()
    req = placement_pb2.PlaceRequest(session_id="s", tenant_id="t")
    await call.write(placement_pb2.PlaceStreamRequest(request_id=1, request=req))
    answer = await asyncio.wait_for(call.read(), 2.0)
    assert (answer.request_id, answer.error.code) == (1, code_pb2.UNAVAILABLE)
    assert answer.error.retry_delay_s > 0
    call.cancel()


async def test_report_session_events_is_idempotent(channel: grpc.aio.Channel) -> None:
    s, _ = await connect(channel)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    req = placement_pb2.ReportSessionEventsRequest(
        worker_id="w1",
        events=[event("r1", K.STEP_START, eid="e1"), event("r1", K.STEP_END, eid="e2")],
    )
    first = await stub.ReportSessionEvents(req, timeout=2.0)
    again = await stub.ReportSessionEvents(req, timeout=2.0)
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert (await stats(channel)).events_total == 2
    await s.close()


# -- admin, health, reflection -------------------------------------------------------------


async def test_tenant_lifecycle(channel: grpc.aio.Channel) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    t = await stub.CreateTenant(
        admin_pb2.CreateTenantRequest(
            tenant=admin_pb2.Tenant(tenant_id="acme", weight=2.0, kv_quota_gpu_bytes=1 << 30)
        )
    )
    assert t.weight == 2.0
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.CreateTenant(
            admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(tenant_id="acme"))
        )
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    from google.protobuf import field_mask_pb2

    u = await stub.UpdateTenant(
        admin_pb2.UpdateTenantRequest(
            tenant=admin_pb2.Tenant(tenant_id="acme", weight=3.0, slo_class="batch"),
            update_mask=field_mask_pb2.FieldMask(paths=["weight"]),
        )
    )
    assert (u.weight, u.kv_quota_gpu_bytes, u.slo_class) == (3.0, 1 << 30, "")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.CreateTenant(
            admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(tenant_id="bad id"))
        )
    assert field_violations(ei.value) == ["tenant.tenant_id"]
    listed = await stub.ListTenants(admin_pb2.ListTenantsRequest())
    assert [x.tenant_id for x in listed.tenants] == ["acme"]
    assert (await stub.DeleteTenant(admin_pb2.DeleteTenantRequest(tenant_id="acme"))).deleted
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetTenant(admin_pb2.GetTenantRequest(tenant_id="acme"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_list_the_services(channel: grpc.aio.Channel) -> None:
    h = health_pb2_grpc.HealthStub(channel)
    for name in (
        "",
        "kvsched.v1.WorkerService",
        "kvsched.v1.PlacementService",
        "kvsched.v1.AdminService",
    ):
        r = await h.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in refl.ServerReflectionInfo(ask()):
        names |= {s.name for s in resp.list_services_response.service}
    assert {
        "kvsched.v1.WorkerService",
        "kvsched.v1.PlacementService",
        "kvsched.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names


async def test_drain_worker_tells_its_stream_and_stops_placing_there(
    channel: grpc.aio.Channel,
) -> None:
    a, _ = await connect(channel, worker_id="wa")
    b, _ = await connect(channel, worker_id="wb")
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    info = await admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="wa", reason="upgrade"))
    assert info.draining
    m = await a.recv()
    assert m.WhichOneof("body") == "drain" and m.drain.worker_drained
    resp = await placement_pb2_grpc.PlacementServiceStub(channel).Place(
        placement_pb2.PlaceRequest(session_id="s", tenant_id="t", max_candidates=4), timeout=1.0
    )
    assert [c.worker_id for c in resp.candidates] == ["wb"]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="nope"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    await a.close()
    await b.close()


# -- durability -------------------------------------------------------------------------------


async def test_acked_events_survive_a_restart(
    service: Service, channel: grpc.aio.Channel, data_dir: object
) -> None:
    s, _ = await connect(channel)
    await s.send(
        batch(2, event("s1", K.STEP_START, ctx=4000), event("s1", K.STEP_END, ctx=4500)),
        batch(3, event("s2", K.STEP_START)),
    )
    await s.recv_until_ack(3)
    await s.close()
    await service.stop()
    cfg = ServeConfig(
        listen="127.0.0.1:0", data_dir=str(data_dir), metrics_port=0, grace_s=0.5, auth="none"
    )
    again = Service(cfg)
    await again.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{again.port}") as ch:
            info = await admin_pb2_grpc.AdminServiceStub(ch).GetSession(
                admin_pb2.GetSessionRequest(session_id="s1")
            )
            assert (info.home_worker_id, info.context_tokens, info.events) == ("w1", 4500, 2)
            assert (await stats(ch)).events_total == 3
            s2, welcome = await connect(ch, resume=3)
            assert welcome.last_acked_seq == 3
            await s2.close()
    finally:
        await again.stop()


def test_status_codes_are_google_rpc_codes() -> None:
    # The error helpers use google.rpc codes that match grpc.StatusCode values.
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT


async def test_reconnect_with_the_same_epoch_is_asked_for_a_resync(
    channel: grpc.aio.Channel,
) -> None:
    s, _ = await connect(channel)
    await s.send(batch(2, event("s1", K.STEP_START)))
    await s.recv_until_ack(2)
    await s.close()
    await asyncio.sleep(0.05)
    again, _ = await connect(channel, resume=2)
    nxt = await again.recv()
    assert nxt.WhichOneof("body") == "resync"
    await again.send(
        worker_pb2.WorkerMessage(
            seq=3,
            pool_snapshot=worker_pb2.PoolSnapshot(
                gpu_used_blocks=0, complete=True
            ),  # the worker lost s1's KV
        )
    )
    await again.recv_until_ack(3)
    info = await admin_pb2_grpc.AdminServiceStub(channel).GetSession(
        admin_pb2.GetSessionRequest(session_id="s1")
    )
    assert info.tier == types_pb2.TIER_UNSPECIFIED  # reconciled to the worker's truth
    await again.close()
    fresh, _ = await connect(channel, epoch=2)  # a new epoch holds nothing: no resync needed
    await fresh.send(batch(2, event("s9", K.STEP_START)))
    kinds = [m.WhichOneof("body") for m in await fresh.recv_until_ack(2)]
    assert "resync" not in kinds
    await fresh.close()


async def test_journal_backlog_is_resource_exhausted_with_retry_info(
    service: Service, channel: grpc.aio.Channel
) -> None:
    assert service.dispatcher is not None
    service.dispatcher.max_pending_appends = -1  # any backlog counts as overload
    s = Stream(channel)
    await s.send(hello())
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await s.recv()
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_s(ei.value) > 0
