"""WorkerClients with reference pools against the real kvsched server on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc, placement_pb2, worker_pb2
from kvsched_client._proto.kvsched.v1 import types_pb2 as K
from kvsched_client.pool import BlockPool
from kvsched_client.router import PlacementClient
from kvsched_client.worker import WorkerClient, session_event

ROOT = Path(__file__).resolve().parents[2]
BS = 16


class VirtualClock:
    """Monotonic time plus an offset the test can jump forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s


def worker(target: str, wid: str, clock: VirtualClock | None = None) -> WorkerClient:
    pool = BlockPool(gpu_capacity_blocks=512, block_size_tokens=BS, host_capacity_blocks=128)
    hello = worker_pb2.Hello(
        worker_id=wid,
        epoch=1,
        endpoint=f"127.0.0.1:{9000 + int(wid[1:])}",
        engine_name="reference",
        model="m",
    )
    return WorkerClient(
        target,
        hello,
        pool,
        clock=clock or time.monotonic,
        heartbeat_interval_s=1.0,
        backoff_initial_s=0.02,
        backoff_max_s=0.2,
        lease_check_interval_s=0.02,
    )


def run_step_into_tool_wait(c: WorkerClient, sid: str, prompt_tokens: int, step: int = 0) -> None:
    """The engine side of one step that ends in a tool call."""
    pool: BlockPool = c.pool  # type: ignore[assignment]
    ev = {"tenant_id": "t", "agent_type": "coder", "step_index": step}
    with c.pool_lock:
        pool.start_step(sid, "t", list(range(prompt_tokens)), c._clock())
    c.report(
        session_event(
            sid, K.STEP_START, context_tokens=prompt_tokens, new_tokens=prompt_tokens, **ev
        )
    )
    with c.pool_lock:
        pool.end_step(sid, c._clock(), list(range(10**6, 10**6 + 40)))
    ctx = prompt_tokens + 40
    c.report(session_event(sid, K.STEP_END, context_tokens=ctx, new_tokens=40, **ev))
    c.report(session_event(sid, K.TOOL_CALL_WAIT, context_tokens=ctx, tool_name="pytest", **ev))


async def until(pred, timeout_s: float = 5.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(loop(), timeout_s)


async def cluster_stats(target: str) -> admin_pb2.ClusterStats:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        return await stub.GetClusterStats(admin_pb2.GetClusterStatsRequest(), timeout=5.0)


async def test_directives_are_enforced_exactly_by_every_worker(service) -> None:
    target = f"127.0.0.1:{service.port}"
    clients = [worker(target, f"w{i}") for i in range(3)]
    for c in clients:
        await c.start()
        assert await c.wait_connected(5.0)
    for i, c in enumerate(clients):
        run_step_into_tool_wait(c, f"s{i}", 1000 + 160 * i)
    for c in clients:
        assert await c.flush(5.0)
    await until(lambda: all(c.stats.directives_applied == 1 for c in clients))
    for i, c in enumerate(clients):
        r = c.pool.residency(f"s{i}", c._clock())  # type: ignore[attr-defined]
        full_blocks = (1000 + 160 * i + 40) // BS
        assert r.gpu_blocks == full_blocks and r.lease_remaining_s > 0
        assert c.pool.held_blocks() == full_blocks  # type: ignore[attr-defined]
    stats = await cluster_stats(target)
    assert stats.events_total == 9 and stats.sessions_tool_wait == 3
    assert stats.workers_connected == 3
    # The server's view of residency came from the pools' own KV events.
    assert stats.gpu_used_blocks == sum(c.pool.gpu_used_blocks() for c in clients)  # type: ignore[attr-defined]
    for c in clients:
        await c.stop()


class RecordingPool(BlockPool):
    """BlockPool that records each directive with the session's residency right after it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.log: list[tuple[str, int, worker_pb2.SessionResidency]] = []

    def apply_directive(self, directive, now):
        res = super().apply_directive(directive, now)
        assert res.ok, res.reason
        self.log.append(
            (directive.session_id, directive.action, self.residency(directive.session_id, now))
        )
        return res


async def test_retain_offload_prefetch_release_are_enforced_exactly(service) -> None:
    # A small GPU: five 20-block sessions waiting on tools do not all fit, so the
    # scheduler retains some, offloads the rest, prefetches them back before their
    # tools return, and releases a finished session.
    target = f"127.0.0.1:{service.port}"
    pool = RecordingPool(
        gpu_capacity_blocks=100, block_size_tokens=BS, host_capacity_blocks=400,
        prefill_tokens_per_s=2000.0,
    )  # fmt: skip
    hello = worker_pb2.Hello(
        worker_id="w1", epoch=1, endpoint="127.0.0.1:9001", engine_name="reference"
    )
    c = WorkerClient(target, hello, pool, heartbeat_interval_s=0.2, lease_check_interval_s=0.02)
    await c.start()
    assert await c.wait_connected(5.0)
    for i in range(5):
        sid, n = f"s{i}", 320
        with c.pool_lock:
            pool.start_step(sid, "t", [i * 10_000 + j for j in range(n)], c._clock())
            pool.end_step(sid, c._clock())
        c.report(
            session_event(sid, K.STEP_START, tenant_id="t", context_tokens=n, new_tokens=n),
            session_event(sid, K.STEP_END, tenant_id="t", context_tokens=n),
            session_event(
                sid, K.TOOL_CALL_WAIT, tenant_id="t", context_tokens=n, tool_name="pytest"
            ),
        )
        assert await c.flush(5.0)
        await until(lambda i=i: len({e[0] for e in pool.log}) == i + 1)
    c.report(session_event("s0", K.SESSION_FINISH, tenant_id="t", context_tokens=320))
    wanted = {
        worker_pb2.RETAIN_GPU,
        worker_pb2.OFFLOAD_HOST,
        worker_pb2.PREFETCH_GPU,
        worker_pb2.RELEASE,
    }
    await until(lambda: wanted <= {a for _, a, _ in pool.log}, 10.0)
    for sid, action, r in pool.log:
        if action == worker_pb2.RETAIN_GPU:
            assert (r.gpu_blocks, r.host_blocks) == (20, 0) and r.lease_remaining_s > 0, sid
        elif action == worker_pb2.OFFLOAD_HOST:
            assert (r.gpu_blocks, r.host_blocks, r.lease_remaining_s) == (0, 20, 0.0), sid
        elif action == worker_pb2.PREFETCH_GPU:
            assert (r.gpu_blocks, r.host_blocks) == (20, 0) and r.lease_remaining_s > 0, sid
        elif action == worker_pb2.RELEASE:
            assert r.lease_remaining_s == 0.0, sid
    pool.check_invariants()
    assert c.stats.directives_applied == len(pool.log) and c.stats.directives_rejected == 0
    await c.stop()


async def test_leases_expire_when_the_server_is_gone_longer_than_every_ttl(service) -> None:
    target = f"127.0.0.1:{service.port}"
    clock = VirtualClock()
    c = worker(target, "w1", clock)
    await c.start()
    assert await c.wait_connected(5.0)
    run_step_into_tool_wait(c, "s1", 800)
    await until(lambda: c.stats.directives_applied == 1)
    pool: BlockPool = c.pool  # type: ignore[assignment]
    ttl_s = pool.residency("s1", clock()).lease_remaining_s
    assert ttl_s > 0 and pool.held_blocks() == 840 // BS
    await service.stop()
    await until(lambda: not c.connected)
    clock.offset_s = ttl_s + 1.0  # the scheduler stays gone past the lease's TTL
    await until(lambda: pool.held_blocks() == 0, 2.0)
    assert c.stats.leases_expired == 1
    # The blocks fell back to the pool's own LRU: still cached, evictable.
    assert pool.gpu_used_blocks() == 840 // BS and pool.heartbeat(clock()).gpu_free_blocks == 512
    await c.stop(flush_timeout_s=0)


async def test_place_falls_back_within_its_deadline_when_the_server_stops(service) -> None:
    target = f"127.0.0.1:{service.port}"
    c = worker(target, "w1")
    await c.start()
    assert await c.wait_connected(5.0)
    req = placement_pb2.PlaceRequest(
        session_id="s9", tenant_id="t", agent_type="coder", context_tokens=100
    )
    async with grpc.aio.insecure_channel(target) as ch:
        placer = PlacementClient(
            ch, deadline_s=1.0, live_workers={"w1": "127.0.0.1:9001", "w2": "x:1"}
        )
        live = await placer.place(req)
        assert not live.fell_back and live.primary == "w1"
        await c.stop(flush_timeout_s=0)
        await service.stop()
        placer.deadline_s = 0.010
        t0 = time.perf_counter()
        res = await placer.place(req)
        assert time.perf_counter() - t0 < 0.1
        assert res.fell_back and set(res.worker_ids) == {"w1", "w2"}


# -- a real server process, killed with SIGKILL mid-stream ---------------------------------


def _spawn(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir.parent / "server.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kvsched", "serve", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(data_dir), "--metrics-port", "0", "--grace-s", "0.5"],
            cwd=ROOT, env={**os.environ, "KVSCHED_LOG_JSON": "true"},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_serving(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise TimeoutError(f"kvsched did not become SERVING (exit {proc.poll()}):\n{tail}")


@pytest.fixture
def server_proc(tmp_path: Path, dead_target: str) -> Iterator[dict]:
    port = int(dead_target.rsplit(":", 1)[1])
    state = {"port": port, "data_dir": tmp_path / "data", "proc": None}
    state["proc"] = _spawn(state["data_dir"], port)
    _wait_serving(state["proc"], port, tmp_path / "server.log")
    yield state
    proc = state["proc"]
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


async def test_server_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
    server_proc,
) -> None:
    port = server_proc["port"]
    target = f"127.0.0.1:{port}"
    clients = [worker(target, f"w{i}") for i in range(2)]
    for c in clients:
        await c.start()
        assert await c.wait_connected(5.0)
    n = 0

    def burst(tag: str, k: int) -> None:
        nonlocal n
        for c in clients:
            c.report(
                *[
                    session_event(f"{tag}{c.hello.worker_id}-{i}", K.STEP_START, tenant_id="t")
                    for i in range(k)
                ]
            )
            n += k

    burst("a", 300)
    for c in clients:
        assert await c.flush(5.0)
    burst("b", 300)  # in flight as the server dies: some acked, some not
    await asyncio.sleep(0.003)
    server_proc["proc"].send_signal(signal.SIGKILL)
    server_proc["proc"].wait(10)
    await until(lambda: not any(c.connected for c in clients))
    burst("c", 100)  # reported while it is gone
    assert all(c.outbox.unacked() or c.outbox.has_pending() for c in clients)
    server_proc["proc"] = _spawn(server_proc["data_dir"], port)
    log = server_proc["data_dir"].parent / "server.log"
    await asyncio.to_thread(_wait_serving, server_proc["proc"], port, log)
    for c in clients:
        assert await c.flush(10.0)
    diag = [(c.stats, c.outbox.stats, c.outbox.acked_seq) for c in clients]
    assert all(c.stats.connects == 2 for c in clients), diag
    stats = await cluster_stats(target)
    assert stats.events_total == n == 1400, (stats, diag)
    assert stats.sessions_running == n
    for c in clients:
        assert c.outbox.stats.dropped_session_events == 0
        await c.stop()
