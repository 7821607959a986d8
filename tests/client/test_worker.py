"""WorkerClient against a fake in-process scheduler: batching, acks, resend, directives."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.pool import BlockPool
from kvsched_client.worker import SyncWorkerClient, WorkerClient, session_event
from tests.client.conftest import session_events_of

K = types_pb2


def hello(worker_id: str = "w1") -> worker_pb2.Hello:
    return worker_pb2.Hello(
        worker_id=worker_id, epoch=1, endpoint="127.0.0.1:9", engine_name="reference"
    )


def make_pool() -> BlockPool:
    return BlockPool(gpu_capacity_blocks=64, block_size_tokens=4, host_capacity_blocks=16)


def client(target: str, pool: BlockPool | None = None, **kw) -> WorkerClient:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("heartbeat_interval_s", 60.0)
    return WorkerClient(target, hello(), pool or make_pool(), **kw)


def events(n: int, session: str = "s") -> list[types_pb2.SessionEvent]:
    return [
        session_event(f"{session}{i}", K.STEP_START, event_id=f"{session}-e{i}") for i in range(n)
    ]


def event_ids(msgs: list[worker_pb2.WorkerMessage]) -> list[str]:
    return [e.event_id for m in msgs for e in session_events_of(m)]


def directive(did: str, sid: str, action: int, epoch: int = 1, ttl_s: float = 30.0):
    return worker_pb2.ServerMessage(
        directive=worker_pb2.RetentionDirective(
            directive_id=did, session_id=sid, action=action, lease_ttl_s=ttl_s, leader_epoch=epoch
        )
    )


async def test_hello_first_then_events_batched_256_and_acked(fake_server) -> None:
    fake = fake_server.fake
    c = client(fake_server.target)
    await c.start()
    assert await c.wait_connected(3.0)
    h = fake.hellos[0]
    assert (h.seq, h.hello.worker_id, h.hello.resume_from_seq) == (1, "w1", 0)
    assert h.hello.cache_spec.gpu_capacity_blocks == 64
    c.report(*events(600))
    assert await c.flush(3.0)
    batches = fake.of("session_events")
    assert [len(m.session_events.events) for m in batches] == [256, 256, 88]
    assert event_ids(batches) == [f"s-e{i}" for i in range(600)]
    seqs = [m.seq for m in fake.received]
    assert seqs == sorted(set(seqs)) and seqs[0] == 2
    assert fake.of("heartbeat")  # one heartbeat as the stream opens
    assert c.outbox.unacked() == []
    await c.stop()


async def test_small_batches_wait_at_most_the_batch_delay(fake_server) -> None:
    fake = fake_server.fake
    c = client(fake_server.target, max_batch_delay_s=0.02)
    await c.start()
    await c.wait_connected(3.0)
    for e in events(3):
        c.report(e)
    await fake.wait_for(lambda: len(fake.of("session_events")) >= 1)
    assert [len(m.session_events.events) for m in fake.of("session_events")] == [3]
    await c.stop()


async def test_reconnect_resends_unacked_and_nothing_is_lost_or_applied_twice(fake_server) -> None:
    fake = fake_server.fake
    c = client(fake_server.target)
    await c.start()
    await c.wait_connected(3.0)
    c.report(*events(10, "a"))
    assert await c.flush(3.0)
    fake.ack = False  # the next ones reach the server but are never acked
    c.report(*events(5, "b"))
    await fake.wait_for(lambda: len(event_ids(fake.of("session_events"))) == 15)
    acked_before = c.outbox.acked_seq
    await fake_server.stop()  # server dies mid-stream, losing what it never acked
    fake.crash()
    c.report(*events(5, "c"))  # reported while it is gone
    await asyncio.sleep(0.1)
    assert not c.connected
    fake.ack = True
    await fake_server.start()
    assert await c.flush(5.0)
    assert fake.hellos[-1].hello.resume_from_seq == acked_before
    applied = event_ids(fake.of("session_events"))
    assert sorted(applied) == sorted(
        [f"a-e{i}" for i in range(5 * 2)] + [f"{s}-e{i}" for s in "bc" for i in range(5)]
    )
    assert len(applied) == len(set(applied)) == 20
    got_b = [i for i in event_ids(fake.received) if i.startswith("b-")]
    assert len(got_b) == 10  # "b" went twice (sent, then resent), applied once
    assert c.stats.connects == 2
    await c.stop()


async def test_directives_are_applied_and_acked_stale_epochs_ignored(fake_server) -> None:
    fake = fake_server.fake
    pool = make_pool()
    c = client(fake_server.target, pool)
    await c.start()
    await c.wait_connected(3.0)
    with c.pool_lock:
        pool.start_step("s1", "t", list(range(10)), time.monotonic())
        pool.end_step("s1", time.monotonic())
    fake.leader_epoch = 2
    fake.send(directive("d1", "s1", worker_pb2.RETAIN_GPU, epoch=2, ttl_s=30.0))
    await fake.wait_for(lambda: len(fake.of("directive_ack")) == 1)
    assert pool.held_blocks() == 2
    fake.send(directive("d0", "s1", worker_pb2.RELEASE, epoch=1))  # an old leader
    fake.send(directive("d2", "ghost", worker_pb2.OFFLOAD_HOST, epoch=2))
    fake.send(directive("d1", "s1", worker_pb2.RETAIN_GPU, epoch=2))  # redelivered
    await fake.wait_for(lambda: len(fake.of("directive_ack")) == 4)
    acks = [
        (m.directive_ack.directive_id, m.directive_ack.outcome, m.directive_ack.reason)
        for m in fake.of("directive_ack")
    ]
    assert acks == [
        ("d1", worker_pb2.DIRECTIVE_APPLIED, ""),
        ("d0", worker_pb2.DIRECTIVE_STALE_EPOCH, "leader epoch 1 < 2"),
        ("d2", worker_pb2.DIRECTIVE_REJECTED, "unknown session"),
        ("d1", worker_pb2.DIRECTIVE_APPLIED, ""),
    ]
    assert pool.held_blocks() == 2  # the stale RELEASE changed nothing
    assert (c.stats.directives_applied, c.stats.directives_stale, c.stats.directives_repeated) == (
        1,
        1,
        1,
    )
    # The pool's KV events (the retain touched cached blocks: none new) and the step's
    # BlockStored went up as KV event batches.
    stored = [e for m in fake.of("kv_events") for e in m.kv_events.events if e.HasField("stored")]
    assert stored and stored[0].stored.session_id == "s1"
    await c.stop()


async def test_resync_is_answered_with_a_full_snapshot_and_drain_is_applied(fake_server) -> None:
    fake = fake_server.fake
    pool = make_pool()
    drains: list[worker_pb2.Drain] = []
    c = client(fake_server.target, pool, on_drain=drains.append)
    await c.start()
    await c.wait_connected(3.0)
    with c.pool_lock:
        pool.start_step("s1", "t", list(range(9)), time.monotonic())
    fake.send(worker_pb2.ServerMessage(resync=worker_pb2.ResyncRequest(reason="reconcile")))
    await fake.wait_for(lambda: len(fake.of("pool_snapshot")) == 1)
    snap = fake.of("pool_snapshot")[0].pool_snapshot
    assert snap.complete and snap.gpu_used_blocks == 3
    assert [(s.session_id, s.gpu_blocks, s.cached_tokens) for s in snap.sessions] == [("s1", 3, 9)]
    fake.send(
        worker_pb2.ServerMessage(
            drain=worker_pb2.Drain(reason="bye", deadline_s=1.0, worker_drained=True)
        )
    )
    await asyncio.wait_for(_until(lambda: c.worker_drained), 3.0)
    assert drains[0].reason == "bye"
    await c.stop()


async def _poison_between_good_events(fake_server) -> None:
    """One refused message between good ones: only it is dropped, with one reconnect."""
    fake = fake_server.fake
    fake.refuse = lambda m: any(e.session_id == "poison" for e in session_events_of(m))
    c = client(fake_server.target)
    await c.start()
    await c.wait_connected(3.0)
    c.report(*events(2, "a"))
    assert await c.flush(3.0)
    c.report(session_event("poison", K.STEP_START))
    await asyncio.sleep(0.01)
    c.report(*events(2, "b"))  # framed behind the refused message
    await asyncio.wait_for(_until(lambda: c.stats.refused_messages == 1), 3.0)
    assert await c.flush(3.0)
    assert event_ids(fake.of("session_events")) == ["a-e0", "a-e1", "b-e0", "b-e1"]
    assert c.stats.connects == 2  # one refusal, one reconnect: no resend loop
    await c.stop()


async def test_refused_message_is_dropped_and_the_stream_goes_on(fake_server) -> None:
    await _poison_between_good_events(fake_server)


@pytest.mark.parametrize("named_in", ["refused_message", "welcome"])
async def test_a_refusal_reported_as_internal_still_drops_only_the_named_message(
    fake_server, named_in: str
) -> None:
    # grpcio's asyncio client can report the server's INVALID_ARGUMENT as
    # INTERNAL when a write races the end of the call; kvsched names the
    # refused seq (a Refused message, the next Welcome), and that is what counts
    fake = fake_server.fake
    fake.refused_message = named_in == "refused_message"
    fake.welcome_names_refused = named_in == "welcome"
    fake.refuse_code = grpc.StatusCode.INTERNAL
    await _poison_between_good_events(fake_server)


async def test_only_the_refused_session_leaves_a_batch_the_rest_is_resent(fake_server) -> None:
    fake = fake_server.fake
    fake.welcome_names_refused = True
    fake.refuse_code = grpc.StatusCode.INTERNAL

    def poison_at(m: worker_pb2.WorkerMessage) -> int:
        ids = [e.session_id for e in session_events_of(m)]
        return ids.index("poison") if "poison" in ids else -1

    fake.refuse = lambda m: poison_at(m) >= 0
    fake.refuse_field = lambda m: f"batch.session_events[{poison_at(m)}].session_id"
    c = client(fake_server.target, max_batch_delay_s=0.05)
    await c.start()
    await c.wait_connected(3.0)
    c.report(
        *events(2, "a"),
        session_event("poison", K.STEP_START, event_id="p0"),
        *events(2, "b"),
        session_event("poison", K.STEP_END, event_id="p1"),
    )
    await asyncio.wait_for(_until(lambda: c.stats.refused_messages == 1), 3.0)
    assert await c.flush(3.0)
    # one message, refused once; resent under the same seq without the session
    assert event_ids(fake.of("session_events")) == ["a-e0", "a-e1", "b-e0", "b-e1"]
    assert c.outbox.stats.dropped_session_events == 2
    assert c.stats.connects == 2
    await c.stop()


async def test_an_internal_error_without_a_refusal_drops_nothing(fake_server) -> None:
    fake = fake_server.fake
    fake.refuse_code = grpc.StatusCode.INTERNAL
    refuse_once = [True]

    def refuse(m: worker_pb2.WorkerMessage) -> bool:
        if refuse_once[0] and session_events_of(m):
            refuse_once[0] = False
            return True
        return False

    fake.refuse = refuse
    c = client(fake_server.target)
    await c.start()
    await c.wait_connected(3.0)
    c.report(*events(3, "a"))
    assert await c.flush(3.0)
    assert event_ids(fake.of("session_events")) == ["a-e0", "a-e1", "a-e2"]  # resent, kept
    assert c.stats.refused_messages == 0
    await c.stop()


async def test_service_gone_reporting_never_blocks_and_drops_oldest(dead_target) -> None:
    pool = make_pool()
    c = client(dead_target, pool, max_buffered_events=100, lease_check_interval_s=0.01)
    await c.start()
    t0 = time.perf_counter()
    for e in events(1000):
        c.report(e)
    assert time.perf_counter() - t0 < 0.5
    assert c.outbox.stats.dropped_session_events == 900
    assert c.outbox.pending_events() == 100
    # The lease timer runs without a scheduler: the lease ends at its TTL.
    now = time.monotonic()
    with c.pool_lock:
        pool.start_step("s1", "t", list(range(8)), now)
        pool.retain("s1", 0.1, 0, now)
        pool.end_step("s1", now)
    assert pool.held_blocks() == 2
    await asyncio.wait_for(_until(lambda: pool.held_blocks() == 0), 2.0)
    assert c.stats.leases_expired == 1
    await c.stop(flush_timeout_s=0)


def test_backoff_is_exponential_with_full_jitter() -> None:
    c = WorkerClient(
        "127.0.0.1:1",
        hello(),
        make_pool(),
        backoff_initial_s=0.1,
        backoff_max_s=2.0,
        rng=random.Random(7),
    )
    for attempt, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (30, 2.0)]:
        draws = [c.backoff_s(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > 0.8 * cap  # jitter spans the range


async def test_sync_facade_runs_its_own_loop_in_a_thread(fake_server) -> None:
    fake = fake_server.fake
    sync = SyncWorkerClient(fake_server.target, hello(), make_pool(), heartbeat_interval_s=60.0)
    assert await asyncio.to_thread(sync.start, 3.0)
    sync.report(*events(5))
    assert await asyncio.to_thread(sync.flush, 3.0)
    assert event_ids(fake.of("session_events")) == [f"s-e{i}" for i in range(5)]
    await asyncio.to_thread(sync.stop)


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.005)


async def test_a_server_batch_applies_its_directives_in_order_then_its_ack(fake_server) -> None:
    fake = fake_server.fake
    fake.ack = False  # only the batch below acks
    pool = make_pool()
    c = client(fake_server.target, pool)
    await c.start()
    await c.wait_connected(3.0)
    assert fake.hellos[-1].hello.accepts_server_batch
    with c.pool_lock:
        pool.start_step("s1", "t", list(range(10)), time.monotonic())
        pool.end_step("s1", time.monotonic())
    c.report(*events(3))
    await fake.wait_for(lambda: len(event_ids(fake.of("session_events"))) == 3)
    assert not c.outbox.idle()
    sent = c.outbox.unacked()[-1].seq
    retain, release = (
        directive(did, "s1", action).directive
        for did, action in (("d1", worker_pb2.RETAIN_GPU), ("d2", worker_pb2.RELEASE))
    )
    fake.send(
        worker_pb2.ServerMessage(
            batch=worker_pb2.ServerBatch(directives=[retain, release], ack_seq=sent)
        )
    )
    await fake.wait_for(lambda: len(fake.of("directive_ack")) == 2)
    assert [m.directive_ack.directive_id for m in fake.of("directive_ack")] == ["d1", "d2"]
    assert pool.held_blocks() == 0  # retained, then released: the order held
    assert c.outbox.acked_seq == sent
    await c.stop(flush_timeout_s=0.0)
