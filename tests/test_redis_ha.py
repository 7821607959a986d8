"""Redis journal and active/standby failover against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from scheduler_service.journal import Record, RecordKind, Snapshot
from scheduler_service.journal.redis import Fenced, LeaderLease, RedisJournal

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (AOF, fsync always) on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make test installs it)")
        pytest.skip("redis-server is not installed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(d),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def rec(i: int) -> Record:
    return Record(RecordKind.WORKER_MESSAGE, float(i), f"p{i}".encode(), "w1", 1, i)


async def test_redis_journal_round_trip_snapshot_and_fencing(redis_url: str) -> None:
    cell = f"unit-{time.monotonic_ns()}"
    j = RedisJournal(redis_url, cell)
    lease = LeaderLease(j.client, cell, ttl_s=5.0, server_id="a")
    j.lease = lease
    assert await lease.try_acquire() and lease.epoch == 1
    await asyncio.gather(*(j.append(rec(i)) for i in range(1, 6)))
    await j.snapshot(Snapshot(5.0, b"state@5"))
    await asyncio.gather(*(j.append(rec(i)) for i in range(6, 9)))
    snap, records = RedisJournal(redis_url, cell).load()
    assert snap == Snapshot(5.0, b"state@5")
    assert [r.seq for r in records] == [6, 7, 8]
    # Another replica takes the lease after ours lapses: our writes are fenced off.
    await j.client.delete(lease.keys.leader)
    other = LeaderLease(j.client, cell, ttl_s=5.0, server_id="b")
    assert await other.try_acquire() and other.epoch == 2
    assert not await lease.renew()
    with pytest.raises(Fenced):
        await j.append(rec(9))
    assert [r.seq for r in RedisJournal(redis_url, cell).load()[1]] == [6, 7, 8]
    await j.close()


# -- failover with real processes ------------------------------------------------------------


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spawn(tmp: Path, name: str, port: int, redis_url: str, cell: str) -> subprocess.Popen[bytes]:
    log = (tmp / f"{name}.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsched",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--journal",
            "redis",
            "--redis-url",
            redis_url,
            "--cell",
            cell,
            "--lease-ttl-s",
            "1.0",
            "--metrics-port",
            "0",
            "--server-id",
            name,
            "--tick-interval-s",
            "0.1",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env={**os.environ, "KVSCHED_LOG_JSON": "true"},
    )


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.3)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def wait_for(pred: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"condition not met within {timeout_s}s")


def hello(resume: int) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(
        seq=1,
        hello=worker_pb2.Hello(
            worker_id="w1",
            epoch=1,
            resume_from_seq=resume,
            cache_spec=types_pb2.CacheSpec(
                block_size_tokens=16,
                bytes_per_token=131072,
                gpu_capacity_blocks=1000,
                prefill_tokens_per_s=2e4,
            ),
        ),
    )


def batch(seq: int) -> worker_pb2.WorkerMessage:
    sid = f"s{seq}"
    return worker_pb2.WorkerMessage(
        seq=seq,
        session_events=worker_pb2.SessionEventBatch(
            events=[
                types_pb2.SessionEvent(
                    event_id=f"{sid}-a",
                    session_id=sid,
                    tenant_id="acme",
                    agent_type="swe-agent",
                    kind=types_pb2.STEP_START,
                    context_tokens=4000,
                ),
                types_pb2.SessionEvent(
                    event_id=f"{sid}-b",
                    session_id=sid,
                    tenant_id="acme",
                    agent_type="swe-agent",
                    kind=types_pb2.STEP_END,
                    context_tokens=4100,
                ),
                types_pb2.SessionEvent(
                    event_id=f"{sid}-c",
                    session_id=sid,
                    tenant_id="acme",
                    agent_type="swe-agent",
                    kind=types_pb2.TOOL_CALL_WAIT,
                    context_tokens=4100,
                    tool_name="pytest",
                ),
            ]
        ),
    )


async def _pump(
    q: asyncio.Queue[worker_pb2.WorkerMessage],
) -> AsyncIterator[worker_pb2.WorkerMessage]:
    while True:
        yield await q.get()


async def stream(
    target: str, resume: int, seqs: list[int]
) -> tuple[worker_pb2.Welcome, int, list[int]]:
    """Hello, send ``seqs``; returns (welcome, highest ack, directive epochs seen)."""
    async with grpc.aio.insecure_channel(target) as ch:
        q: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()
        call = worker_pb2_grpc.WorkerServiceStub(ch).Connect(
            _pump(q), timeout=20, wait_for_ready=True
        )
        await q.put(hello(resume))
        welcome = (await call.read()).welcome
        for s in seqs:
            await q.put(batch(s))
        acked, epochs = 0, []
        while seqs and acked < seqs[-1]:
            m = await asyncio.wait_for(call.read(), 10)
            if m.WhichOneof("body") == "ack":
                acked = m.ack.seq
            elif m.WhichOneof("body") == "directive":
                epochs.append(m.directive.leader_epoch)
        call.cancel()
        return welcome, acked, epochs


@pytest.mark.timeout(180)
def test_standby_takes_over_within_3s_and_a_deposed_leader_is_fenced(
    tmp_path: Path, redis_url: str, port_factory: Callable[[], int]
) -> None:
    cell = f"ha-{time.monotonic_ns()}"
    pa, pb = port_factory(), port_factory()
    a = spawn(tmp_path, "a", pa, redis_url, cell)
    wait_for(lambda: serving(pa), 30)
    b = spawn(tmp_path, "b", pb, redis_url, cell)
    try:
        time.sleep(1.5)
        assert not serving(pb), "the standby must not serve while the leader holds the lease"
        # Workers are given every replica; only the leader listens, so pick_first finds it.
        both = f"ipv4:127.0.0.1:{pa},127.0.0.1:{pb}"
        welcome, acked, epochs = asyncio.run(stream(both, 0, [2, 3, 4]))
        assert welcome.leader_epoch == 1 and acked == 4 and set(epochs) == {1}

        # kill -9 the leader: the standby serves within 3 s, with every acked event.
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        took = wait_for(lambda: serving(pb), 10)
        assert took < 3.0, f"failover took {took:.2f}s"
        welcome, acked, epochs = asyncio.run(stream(both, 4, [5]))
        assert welcome.leader_epoch == 2
        assert welcome.last_acked_seq == 4  # the standby followed the journal
        assert acked == 5 and set(epochs) == {2}

        # A paused leader is deposed: its lease lapses, the restarted A takes over,
        # and B, once resumed, can no longer write (fenced) and exits.
        a = spawn(tmp_path, "a2", pa, redis_url, cell)
        time.sleep(2.0)
        b.send_signal(signal.SIGSTOP)
        wait_for(lambda: serving(pa), 10)
        b.send_signal(signal.SIGCONT)
        rc = b.wait(timeout=15)
        # the log says why when it is not the fenced exit (75)
        assert rc == 75, f"deposed leader exited {rc}:\n{_tail(tmp_path / 'b.log')}"
        welcome, acked, epochs = asyncio.run(stream(both, 5, [6]))
        assert welcome.leader_epoch == 3 and welcome.last_acked_seq == 5
        assert acked == 6 and set(epochs) == {3}
        r = redis.Redis.from_url(redis_url)
        assert int(r.get(f"kvsched:{cell}:epoch") or 0) == 3
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
