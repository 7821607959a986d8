"""WorkerClient and PlacementClient against a server with bearer-token auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc, placement_pb2, worker_pb2
from kvsched_client._proto.kvsched.v1 import types_pb2 as K
from kvsched_client.pool import BlockPool
from kvsched_client.router import PlacementClient
from kvsched_client.worker import WorkerClient, session_event

ADMIN_TOKEN = "kvs_clientadmin_" + "s" * 32


@pytest.fixture
async def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    from scheduler_service.config import ServeConfig
    from scheduler_service.server import Service

    monkeypatch.setenv("KVSCHED_ADMIN_TOKEN", ADMIN_TOKEN)
    svc = Service(
        ServeConfig(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path / "d"),
            auth="token",
            metrics_port=0,
            grace_s=0.2,
        )
    )
    await svc.start()
    yield f"127.0.0.1:{svc.port}"
    await svc.stop()


async def mint(target: str, role: int) -> str:
    async with grpc.aio.insecure_channel(target) as ch:
        r = await admin_pb2_grpc.AdminServiceStub(ch).CreateToken(
            admin_pb2.CreateTokenRequest(role=role),  # type: ignore[arg-type]
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        )
    return r.token


def worker(target: str, token: str | None) -> WorkerClient:
    hello = worker_pb2.Hello(
        worker_id="w1", epoch=1, endpoint="127.0.0.1:9001", engine_name="reference"
    )
    pool = BlockPool(gpu_capacity_blocks=256, block_size_tokens=16)
    return WorkerClient(
        target, hello, pool, token=token, backoff_initial_s=0.01, backoff_max_s=0.05
    )


async def test_worker_and_router_tokens(secured: str) -> None:
    target = secured
    anonymous = worker(target, None)
    await anonymous.start()
    assert not await anonymous.wait_connected(0.5)  # UNAUTHENTICATED, retried with backoff
    assert anonymous.stats.stream_failures >= 1
    await anonymous.stop(flush_timeout_s=0)

    c = worker(target, await mint(target, admin_pb2.ROLE_WORKER))
    await c.start()
    assert await c.wait_connected(5.0)
    with c.pool_lock:
        c.pool.start_step("s1", "t", list(range(400)), c._clock())  # type: ignore[attr-defined]
        c.pool.end_step("s1", c._clock())  # type: ignore[attr-defined]
    c.report(
        session_event("s1", K.STEP_START, tenant_id="t", context_tokens=400, new_tokens=400),
        session_event("s1", K.STEP_END, tenant_id="t", context_tokens=400),
        session_event(
            "s1", K.TOOL_CALL_WAIT, tenant_id="t", context_tokens=400, tool_name="pytest"
        ),
    )
    assert await c.flush(5.0)
    for _ in range(200):
        if c.stats.directives_applied:
            break
        await asyncio.sleep(0.01)
    assert c.stats.directives_applied == 1

    req = placement_pb2.PlaceRequest(
        session_id="s1", tenant_id="t", agent_type="agent", context_tokens=400
    )
    router_token = await mint(target, admin_pb2.ROLE_ROUTER)
    async with grpc.aio.insecure_channel(target) as ch:
        live = {"w1": "127.0.0.1:9001"}
        denied = await PlacementClient(ch, deadline_s=1.0, live_workers=live).place(req)
        assert denied.fell_back and denied.reason == "fallback:unauthenticated"
        ok = await PlacementClient(ch, deadline_s=1.0, live_workers=live, token=router_token).place(
            req
        )
        assert not ok.fell_back and ok.primary == "w1"
    await c.stop()
