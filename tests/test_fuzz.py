"""Fuzzing: arbitrary field values and raw bytes never crash the service or change state.

The default suite runs a few thousand cases; ``KVSCHED_FUZZ_EXAMPLES`` raises it
(the long run uses 100000).
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsched_client._proto.kvsched.v1 import placement_pb2, types_pb2, worker_pb2
from scheduler_service.api import convert
from scheduler_service.api.dispatch import Dispatcher, StreamHandle
from scheduler_service.domain import Rejected, WorkerId
from scheduler_service.engine import Engine
from scheduler_service.journal import MemoryJournal
from scheduler_service.server import Service
from scheduler_service.telemetry import Metrics

EXAMPLES = int(os.environ.get("KVSCHED_FUZZ_EXAMPLES", "1500"))

u64 = st.one_of(
    st.sampled_from([0, 1, 2**30, 2**32 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)
)
u32 = st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
f64 = st.floats(allow_nan=True, allow_infinity=True)
text = st.one_of(
    st.sampled_from(["", "s1", "w1", "x" * 300, "tab\there", "\x00", "ünï"]),
    st.text(max_size=40),
)
kind = st.one_of(st.sampled_from(list(types_pb2.SessionEventKind.values())), st.integers(0, 50))


def session_event() -> st.SearchStrategy[types_pb2.SessionEvent]:
    return st.builds(
        lambda eid, sid, tid, at, step, k, ctx, new, tool, lat, t: types_pb2.SessionEvent(
            event_id=eid,
            session_id=sid,
            tenant_id=tid,
            agent_type=at,
            step_index=step,
            kind=k,
            context_tokens=ctx,
            new_tokens=new,
            tool_name=tool,
            hints=types_pb2.SessionHints(expected_tool_latency_s=lat),
            event_time_s=t,
        ),
        text,
        st.sampled_from(["s1", "s2", "s3"]) | text,
        st.sampled_from(["acme"]) | text,
        text,
        u32,
        kind,
        u64,
        u64,
        text,
        f64,
        f64,
    )


block_hash = st.one_of(
    st.builds(lambda b: types_pb2.BlockHash(digest=b), st.binary(max_size=80)),
    st.builds(lambda v: types_pb2.BlockHash(uint64_hash=v), u64),
    st.builds(lambda v: types_pb2.BlockHash(int64_hash=v), st.integers(-(2**63), 2**63 - 1)),
    st.just(types_pb2.BlockHash()),
)

kv_event = st.one_of(
    st.builds(
        lambda hs, tier, n: types_pb2.KvEvent(
            stored=types_pb2.BlockStored(block_hashes=hs, tier=tier, token_count=n)
        ),
        st.lists(block_hash, max_size=4),
        st.integers(0, 7),
        u32,
    ),
    st.builds(
        lambda hs, tier: types_pb2.KvEvent(
            removed=types_pb2.BlockRemoved(block_hashes=hs, tier=tier)
        ),
        st.lists(block_hash, max_size=4),
        st.integers(0, 7),
    ),
    st.builds(
        lambda tier: types_pb2.KvEvent(all_cleared=types_pb2.AllBlocksCleared(tier=tier)),
        st.integers(0, 7),
    ),
    st.just(types_pb2.KvEvent()),
)

directive_ack = st.builds(
    lambda did, outcome, reason: worker_pb2.DirectiveAck(
        directive_id=did, outcome=outcome, reason=reason
    ),
    text,
    st.integers(0, 9),
    text,
)


def _worker_batch(
    seq: int,
    acks: list[worker_pb2.DirectiveAck],
    kv: list[types_pb2.KvEvent] | None,
    evs: list[types_pb2.SessionEvent],
) -> worker_pb2.WorkerMessage:
    b = worker_pb2.WorkerBatch(directive_acks=acks, session_events=evs)
    if kv is not None:
        b.kv_events.CopyFrom(types_pb2.KvEventBatch(events=kv))
    return worker_pb2.WorkerMessage(seq=seq, batch=b)


worker_message = st.one_of(
    st.builds(
        _worker_batch,
        u64,
        st.lists(directive_ack, max_size=3),
        st.none() | st.lists(kv_event, max_size=3),
        st.lists(session_event(), max_size=4),
    ),
    st.builds(
        lambda seq, evs: worker_pb2.WorkerMessage(
            seq=seq, session_events=worker_pb2.SessionEventBatch(events=evs)
        ),
        u64,
        st.lists(session_event(), max_size=5),
    ),
    st.builds(
        lambda seq, evs, ts: worker_pb2.WorkerMessage(
            seq=seq, kv_events=types_pb2.KvEventBatch(events=evs, ts_s=ts)
        ),
        u64,
        st.lists(kv_event, max_size=4),
        f64,
    ),
    st.builds(
        lambda seq, a, b, c, d: worker_pb2.WorkerMessage(
            seq=seq,
            heartbeat=worker_pb2.Heartbeat(
                gpu_free_blocks=a, host_free_blocks=b, queued_prefill_tokens=c, running_steps=d
            ),
        ),
        u64,
        u64,
        u64,
        u64,
        u32,
    ),
    st.builds(
        lambda seq, did, outcome, reason: worker_pb2.WorkerMessage(
            seq=seq,
            directive_ack=worker_pb2.DirectiveAck(directive_id=did, outcome=outcome, reason=reason),
        ),
        u64,
        text,
        st.integers(0, 9),
        text,
    ),
    st.builds(
        lambda seq, sid, g, h, lease: worker_pb2.WorkerMessage(
            seq=seq,
            pool_snapshot=worker_pb2.PoolSnapshot(
                sessions=[
                    worker_pb2.SessionResidency(
                        session_id=sid,
                        tenant_id="acme",
                        gpu_blocks=g,
                        host_blocks=h,
                        lease_remaining_s=lease,
                    )
                ],
                complete=True,
            ),
        ),
        u64,
        text,
        u64,
        u64,
        f64,
    ),
    st.builds(lambda seq: worker_pb2.WorkerMessage(seq=seq), u64),
)


def _fingerprint(d: Dispatcher) -> tuple[object, ...]:
    e = d.engine
    views = tuple(
        (v.session_id, v.state, v.tier, v.context_tokens, v.events, v.home_worker_id)
        for sid in ("s1", "s2", "s3")
        if (v := e.session_view(sid, 0.0)) is not None  # type: ignore[arg-type]
    )
    s = e.stats(0.0)
    return (
        views,
        s.events_total,
        tuple((w.spec.worker_id, w.gpu_used_blocks) for w in e.worker_views()),
    )


def _dispatcher() -> tuple[Dispatcher, StreamHandle]:
    d = Dispatcher(Engine(), MemoryJournal(), Metrics.create())
    hello = worker_pb2.Hello(
        worker_id="w1",
        epoch=1,
        cache_spec=types_pb2.CacheSpec(
            block_size_tokens=16,
            bytes_per_token=1024,
            gpu_capacity_blocks=1000,
            prefill_tokens_per_s=1e4,
        ),
    )
    d.engine.register_worker(convert.hello_from_pb(hello), 0.0)
    return d, StreamHandle(WorkerId("w1"), 1, send=lambda m: None, close=lambda r: None)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(worker_message, min_size=1, max_size=6))
def test_arbitrary_stream_messages_are_applied_or_rejected_cleanly(
    msgs: list[worker_pb2.WorkerMessage],
) -> None:
    async def run() -> None:
        d, handle = _dispatcher()
        for i, m in enumerate(msgs):
            before = _fingerprint(d)
            last_seq = handle.last_seq_in_stream
            try:
                d.worker_message(handle, m, now=float(i))
            except Rejected as r:
                assert r.field  # names what was wrong
                assert _fingerprint(d) == before, f"rejected {r.field} but state changed"
                assert handle.last_seq_in_stream in (last_seq, m.seq)

    asyncio.run(run())


@settings(max_examples=max(200, EXAMPLES // 5), deadline=None)
@given(
    req=st.builds(
        lambda sid, tid, at, step, ctx, new, k, cands, hs: placement_pb2.PlaceRequest(
            session_id=sid,
            tenant_id=tid,
            agent_type=at,
            step_index=step,
            context_tokens=ctx,
            new_tokens=new,
            max_candidates=k,
            candidate_worker_ids=cands,
            prefix_block_hashes=hs,
        ),
        text,
        text,
        text,
        u32,
        u64,
        u64,
        u32,
        st.lists(text, max_size=3),
        st.lists(block_hash, max_size=3),
    )
)
def test_arbitrary_place_requests_are_answered_or_rejected(req: placement_pb2.PlaceRequest) -> None:
    d, _ = _dispatcher()
    try:
        parsed = convert.place_request_from_pb(req)
    except Rejected as r:
        assert r.field
        return
    placement = d.engine.place(parsed, 1.0)
    assert len(placement.candidates) <= parsed.max_candidates


async def test_raw_garbage_on_the_wire_is_a_clean_error(service: Service) -> None:
    rng = __import__("random").Random(7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        methods = [
            "/kvsched.v1.PlacementService/Place",
            "/kvsched.v1.PlacementService/ReportSessionEvents",
            "/kvsched.v1.AdminService/CreateTenant",
        ]
        for i in range(300):
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
            call = ch.unary_unary(methods[i % len(methods)])
            try:
                await call(raw, timeout=2.0)
            except grpc.aio.AioRpcError as err:
                assert err.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.UNKNOWN,
                ), err.code()
        stream = ch.stream_stream("/kvsched.v1.WorkerService/Connect")

        async def junk():  # type: ignore[no-untyped-def]
            for _ in range(5):
                yield bytes(rng.getrandbits(8) for _ in range(32))

        try:
            async for _ in stream(junk(), timeout=2.0):
                pass
        except grpc.aio.AioRpcError as err:
            assert err.code() != grpc.StatusCode.OK
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


@settings(max_examples=max(300, EXAMPLES // 3), deadline=None)
@given(ev=session_event())
def test_fast_path_conversion_agrees_with_the_field_by_field_checks(
    ev: types_pb2.SessionEvent,
) -> None:
    def outcome(fn):  # type: ignore[no-untyped-def]
        try:
            return fn(ev, "e", WorkerId("w"))
        except Rejected as r:
            return ("rejected", r.field)

    assert outcome(convert.session_event_from_pb) == outcome(convert._session_event_checked)


@pytest.mark.slow
def test_long_fuzz_run_100k_cases() -> None:
    """The long run: 100,000 stream messages (``pytest --runslow -k long_fuzz``)."""
    run = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))(
        given(msgs=st.lists(worker_message, min_size=5, max_size=5))(
            test_arbitrary_stream_messages_are_applied_or_rejected_cleanly.hypothesis.inner_test
        )
    )
    run()
