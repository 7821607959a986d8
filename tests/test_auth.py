"""Authentication, authorisation and tenant isolation over a (role, tenant, RPC) matrix."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

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
from tests.test_service import retry_delay_s

ADMIN_TOKEN = "kvs_bootstrap0_" + "a" * 32
OK, DENIED, UNAUTH, NOT_FOUND = "OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"


@pytest.fixture
async def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
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
    yield svc
    await svc.stop()


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def ev(sid: str, tenant: str, kind: int = types_pb2.STEP_START) -> types_pb2.SessionEvent:
    return types_pb2.SessionEvent(
        event_id=f"{sid}-{kind}",
        session_id=sid,
        tenant_id=tenant,
        agent_type="a",
        kind=kind,
        context_tokens=100,
    )  # type: ignore[arg-type]


def hello(worker: str) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(
        seq=1,
        hello=worker_pb2.Hello(
            worker_id=worker,
            epoch=1,
            cache_spec=types_pb2.CacheSpec(
                block_size_tokens=16,
                bytes_per_token=1024,
                gpu_capacity_blocks=1000,
                prefill_tokens_per_s=1e4,
            ),
        ),
    )


async def stream_events(
    ch: grpc.aio.Channel, token: str | None, worker: str, events: list[types_pb2.SessionEvent]
) -> str:
    """Open a stream, send a batch; 'OK' once it is acked, else the status code name."""

    async def gen() -> AsyncIterator[worker_pb2.WorkerMessage]:
        yield hello(worker)
        yield worker_pb2.WorkerMessage(
            seq=2, session_events=worker_pb2.SessionEventBatch(events=events)
        )
        await asyncio.sleep(5)

    call = worker_pb2_grpc.WorkerServiceStub(ch).Connect(gen(), metadata=md(token), timeout=5)
    try:
        async for m in call:
            if m.WhichOneof("body") == "ack" and m.ack.seq == 2:
                call.cancel()
                return OK
    except grpc.aio.AioRpcError as e:
        if e.code().name == "INTERNAL":
            print("INTERNAL DETAILS", e.details(), e.debug_error_string())
        return e.code().name
    return "EOF"


import asyncio  # noqa: E402


async def code_of(coro: Awaitable[object]) -> str:
    try:
        await coro
        return OK
    except grpc.aio.AioRpcError as e:
        return e.code().name


async def stream_place_codes(
    ch: grpc.aio.Channel, token: str | None, reqs: list[placement_pb2.PlaceRequest]
) -> list[str]:
    """Place each request on one PlaceStream: 'OK', a PlaceError's code name, or the
    status code name of the stream once it has ended (and nothing after it)."""
    call = placement_pb2_grpc.PlacementServiceStub(ch).PlaceStream(metadata=md(token))
    out: list[str] = []
    try:
        for i, req in enumerate(reqs):
            await call.write(placement_pb2.PlaceStreamRequest(request_id=i, request=req))
            answer = await asyncio.wait_for(call.read(), 5.0)
            assert answer is not grpc.aio.EOF and answer.request_id == i
            if answer.HasField("error"):
                out.append(code_pb2.Code.Name(answer.error.code))
            else:
                out.append(OK)
    except grpc.aio.AioRpcError as e:
        out.append(e.code().name)
    finally:
        call.cancel()
    return out


async def test_authorisation_matrix(secured: Service) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        place = placement_pb2_grpc.PlacementServiceStub(ch)
        for t in ("ta", "tb"):
            await admin.CreateTenant(
                admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(tenant_id=t)),
                metadata=md(ADMIN_TOKEN),
            )

        async def mint(role: int, tenant: str = "") -> str:
            r = await admin.CreateToken(
                admin_pb2.CreateTokenRequest(role=role, tenant_id=tenant),  # type: ignore[arg-type]
                metadata=md(ADMIN_TOKEN),
            )
            return r.token

        tokens = {
            "none": None,
            "bogus": "kvs_nosuchid_" + "b" * 30,
            "admin": ADMIN_TOKEN,
            "worker@fleet": await mint(admin_pb2.ROLE_WORKER),
            "worker@ta": await mint(admin_pb2.ROLE_WORKER, "ta"),
            "router@ta": await mint(admin_pb2.ROLE_ROUTER, "ta"),
            "tadmin@ta": await mint(admin_pb2.ROLE_TENANT_ADMIN, "ta"),
            "tadmin@tb": await mint(admin_pb2.ROLE_TENANT_ADMIN, "tb"),
        }
        # Sessions of both tenants exist (streamed by the fleet-wide worker token).
        assert (
            await stream_events(
                ch, tokens["worker@fleet"], "w-fleet", [ev("sa", "ta"), ev("sb", "tb")]
            )
            == OK
        )

        # A worker that stays connected, so Place has somewhere to place.
        live_q: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()

        async def live_gen() -> AsyncIterator[worker_pb2.WorkerMessage]:
            yield hello("w-live")
            await live_q.get()

        live = worker_pb2_grpc.WorkerServiceStub(ch).Connect(live_gen(), metadata=md(ADMIN_TOKEN))
        assert (await live.read()).WhichOneof("body") == "welcome"
        nick = {tok: name for name, tok in tokens.items()}

        rpcs: dict[str, Callable[[str | None], Awaitable[object]]] = {
            "stream ta events": lambda t: stream_events(
                ch, t, f"w-{nick[t]}", [ev(f"x-{nick[t]}", "ta")]
            ),
            "stream tb events": lambda t: stream_events(
                ch, t, f"w2-{nick[t]}", [ev(f"y-{nick[t]}", "tb")]
            ),
            "Place ta": lambda t: code_of(
                place.Place(
                    placement_pb2.PlaceRequest(session_id="sa", tenant_id="ta"), metadata=md(t)
                )
            ),
            "Place tb": lambda t: code_of(
                place.Place(
                    placement_pb2.PlaceRequest(session_id="sb", tenant_id="tb"), metadata=md(t)
                )
            ),
            "PlaceStream ta": lambda t: stream_place_codes(
                ch, t, [placement_pb2.PlaceRequest(session_id="sa", tenant_id="ta")]
            ),
            "PlaceStream tb": lambda t: stream_place_codes(
                ch, t, [placement_pb2.PlaceRequest(session_id="sb", tenant_id="tb")]
            ),
            "GetSession sa": lambda t: code_of(
                admin.GetSession(admin_pb2.GetSessionRequest(session_id="sa"), metadata=md(t))
            ),
            "GetSession sb": lambda t: code_of(
                admin.GetSession(admin_pb2.GetSessionRequest(session_id="sb"), metadata=md(t))
            ),
            "GetTenant ta": lambda t: code_of(
                admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="ta"), metadata=md(t))
            ),
            "UpdateTenant ta weight": lambda t: code_of(
                admin.UpdateTenant(
                    admin_pb2.UpdateTenantRequest(
                        tenant=admin_pb2.Tenant(tenant_id="ta", weight=5),
                        update_mask={"paths": ["weight"]},
                    ),
                    metadata=md(t),
                )
            ),
            "UpdateTenant ta name": lambda t: code_of(
                admin.UpdateTenant(
                    admin_pb2.UpdateTenantRequest(
                        tenant=admin_pb2.Tenant(tenant_id="ta", display_name="A"),
                        update_mask={"paths": ["display_name"]},
                    ),
                    metadata=md(t),
                )
            ),
            "CreateTenant": lambda t: code_of(
                admin.CreateTenant(
                    admin_pb2.CreateTenantRequest(
                        tenant=admin_pb2.Tenant(tenant_id=f"new{abs(hash(t)) % 10**6}")
                    ),
                    metadata=md(t),
                )
            ),
            "ListWorkers": lambda t: code_of(
                admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=md(t))
            ),
            "mint router@ta": lambda t: code_of(
                admin.CreateToken(
                    admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ROUTER, tenant_id="ta"),
                    metadata=md(t),
                )
            ),
            "mint admin": lambda t: code_of(
                admin.CreateToken(
                    admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ADMIN), metadata=md(t)
                )
            ),
        }
        U, D, N = UNAUTH, DENIED, NOT_FOUND
        expected = {
            #                           none bogus admin  w@fleet w@ta  r@ta  ta@ta  ta@tb
            "stream ta events": (U, U, OK, OK, OK, D, D, D),
            "stream tb events": (U, U, OK, OK, D, D, D, D),
            "Place ta": (U, U, OK, D, D, OK, D, D),
            "Place tb": (U, U, OK, D, D, D, D, D),
            "PlaceStream ta": ([U], [U], [OK], [D], [D], [OK], [D], [D]),
            "PlaceStream tb": ([U], [U], [OK], [D], [D], [D], [D], [D]),
            "GetSession sa": (U, U, OK, D, D, D, OK, N),
            "GetSession sb": (U, U, OK, D, D, D, N, OK),
            "GetTenant ta": (U, U, OK, D, D, D, OK, D),
            "UpdateTenant ta weight": (U, U, OK, D, D, D, D, D),
            "UpdateTenant ta name": (U, U, OK, D, D, D, OK, D),
            "CreateTenant": (U, U, OK, D, D, D, D, D),
            "ListWorkers": (U, U, OK, D, D, D, D, D),
            "mint router@ta": (U, U, OK, D, D, D, OK, D),
            "mint admin": (U, U, OK, D, D, D, D, D),
        }
        names = list(tokens)
        got = {rpc: tuple([await fn(tokens[n]) for n in names]) for rpc, fn in rpcs.items()}
        live.cancel()
        wrong = {
            rpc: dict(zip(names, got[rpc], strict=True)) for rpc in got if got[rpc] != expected[rpc]
        }
        assert not wrong, wrong


async def test_worker_ids_are_bound_to_the_token_that_registered_them(secured: Service) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        a = (
            await admin.CreateToken(
                admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_WORKER), metadata=md(ADMIN_TOKEN)
            )
        ).token
        b = (
            await admin.CreateToken(
                admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_WORKER), metadata=md(ADMIN_TOKEN)
            )
        ).token
        assert await stream_events(ch, a, "gpu-0", [ev("s1", "t")]) == OK
        assert await stream_events(ch, b, "gpu-0", [ev("s2", "t")]) == DENIED
        assert await stream_events(ch, a, "gpu-0", [ev("s3", "t", types_pb2.STEP_END)]) == OK
        listed = await admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=md(ADMIN_TOKEN))
        assert [list(t.worker_ids) for t in listed.tokens if t.worker_ids] == [["gpu-0"]]


async def test_revoked_tokens_stop_working_and_tokens_survive_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSCHED_ADMIN_TOKEN", ADMIN_TOKEN)
    cfg = ServeConfig(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "d"),
        auth="token",
        metrics_port=0,
        grace_s=0.2,
    )
    svc = Service(cfg)
    await svc.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        keep = await admin.CreateToken(
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ROUTER), metadata=md(ADMIN_TOKEN)
        )
        gone = await admin.CreateToken(
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ROUTER), metadata=md(ADMIN_TOKEN)
        )
        await admin.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=gone.info.token_id), metadata=md(ADMIN_TOKEN)
        )
    await svc.stop()
    monkeypatch.delenv("KVSCHED_ADMIN_TOKEN", raising=False)
    svc = Service(cfg)
    await svc.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            place = placement_pb2_grpc.PlacementServiceStub(ch)
            req = placement_pb2.PlaceRequest(session_id="s", tenant_id="t")
            # No worker: UNAVAILABLE proves the call got past authentication.
            assert await code_of(place.Place(req, metadata=md(keep.token))) == "UNAVAILABLE"
            assert await code_of(place.Place(req, metadata=md(gone.token))) == UNAUTH
            assert await code_of(place.Place(req, metadata=md(ADMIN_TOKEN))) == "UNAVAILABLE"
    finally:
        await svc.stop()


async def create_tenant(ch: grpc.aio.Channel, tenant_id: str, **fields: int) -> None:
    """Create a tenant as the bootstrap admin."""
    await admin_pb2_grpc.AdminServiceStub(ch).CreateTenant(
        admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(tenant_id=tenant_id, **fields)),
        metadata=md(ADMIN_TOKEN),
    )


async def test_tenant_rate_limit_is_resource_exhausted_and_spares_other_tenants(
    secured: Service,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        await create_tenant(ch, "flood", event_rate_limit_per_s=5)
        await create_tenant(ch, "calm", event_rate_limit_per_s=1000)
        assert await stream_events(ch, ADMIN_TOKEN, "w", [ev("f", "flood"), ev("c", "calm")]) == OK
        place = placement_pb2_grpc.PlacementServiceStub(ch)
        codes = [
            await code_of(
                place.Place(
                    placement_pb2.PlaceRequest(session_id="f", tenant_id="flood"),
                    metadata=md(ADMIN_TOKEN),
                )
            )
            for _ in range(40)
        ]
        assert (codes.count("RESOURCE_EXHAUSTED") >= 30 and codes[0] == "UNAVAILABLE") or codes[
            0
        ] == OK
        try:
            await place.Place(
                placement_pb2.PlaceRequest(session_id="f", tenant_id="flood"),
                metadata=md(ADMIN_TOKEN),
            )
        except grpc.aio.AioRpcError as e:
            assert retry_delay_s(e) > 0
        calm = [
            await code_of(
                place.Place(
                    placement_pb2.PlaceRequest(session_id="c", tenant_id="calm"),
                    metadata=md(ADMIN_TOKEN),
                    timeout=0.5,
                )
            )
            for _ in range(40)
        ]
        assert calm == ["UNAVAILABLE"] * 40  # never throttled by the other tenant's flood


async def test_place_stream_throttles_per_request_and_ends_when_its_token_is_revoked(
    secured: Service,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        await create_tenant(ch, "flood", event_rate_limit_per_s=5)
        await create_tenant(ch, "calm", event_rate_limit_per_s=1000)
        flood = placement_pb2.PlaceRequest(session_id="f", tenant_id="flood")
        calm = placement_pb2.PlaceRequest(session_id="c", tenant_id="calm")
        # no live worker: an answer past the limiter is UNAVAILABLE
        codes = await stream_place_codes(ch, ADMIN_TOKEN, [flood] * 40 + [calm] * 5)
        assert len(codes) == 45  # every refusal came back on the stream; it stayed open
        assert codes[0] == "UNAVAILABLE" and codes[1:40].count("RESOURCE_EXHAUSTED") >= 30
        assert codes[40:] == ["UNAVAILABLE"] * 5  # the other tenant is not throttled
        call = placement_pb2_grpc.PlacementServiceStub(ch).PlaceStream(metadata=md(ADMIN_TOKEN))
        await call.write(placement_pb2.PlaceStreamRequest(request_id=1, request=flood))
        answer = await asyncio.wait_for(call.read(), 5.0)
        assert answer.error.code == code_pb2.RESOURCE_EXHAUSTED
        assert answer.error.retry_delay_s > 0
        call.cancel()

        admin = admin_pb2_grpc.AdminServiceStub(ch)
        router = await admin.CreateToken(
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ROUTER), metadata=md(ADMIN_TOKEN)
        )
        call = placement_pb2_grpc.PlacementServiceStub(ch).PlaceStream(metadata=md(router.token))
        await call.write(placement_pb2.PlaceStreamRequest(request_id=1, request=calm))
        assert (await asyncio.wait_for(call.read(), 5.0)).error.code == code_pb2.UNAVAILABLE
        await admin.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=router.info.token_id), metadata=md(ADMIN_TOKEN)
        )
        await call.write(placement_pb2.PlaceStreamRequest(request_id=2, request=calm))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(call.read(), 5.0)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_new_session_over_the_tenant_session_limit_is_resource_exhausted(
    secured: Service,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        await create_tenant(ch, "cap", max_concurrent_sessions=1)
        assert await stream_events(ch, ADMIN_TOKEN, "w1", [ev("s1", "cap")]) == OK
        place = placement_pb2_grpc.PlacementServiceStub(ch)

        def req(sid: str, tenant: str = "cap") -> placement_pb2.PlaceRequest:
            return placement_pb2.PlaceRequest(session_id=sid, tenant_id=tenant)

        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await place.Place(req("s2"), metadata=md(ADMIN_TOKEN))
        assert ei.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_sessions" in (ei.value.details() or "")
        assert retry_delay_s(ei.value) > 0
        # the live session and other tenants are not limited (no worker is
        # connected any more, so the answer is UNAVAILABLE, not EXHAUSTED)
        assert await code_of(place.Place(req("s1"), metadata=md(ADMIN_TOKEN))) == "UNAVAILABLE"
        assert await code_of(place.Place(req("x", "open"), metadata=md(ADMIN_TOKEN))) == (
            "UNAVAILABLE"
        )
        # once s1 finishes, s2 may start
        done = ev("s1", "cap", types_pb2.SESSION_FINISH)
        assert await stream_events(ch, ADMIN_TOKEN, "w2", [done]) == OK
        assert await code_of(place.Place(req("s2"), metadata=md(ADMIN_TOKEN))) == "UNAVAILABLE"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


async def test_mtls_on_loopback(tmp_path: Path) -> None:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl not installed")
    d = tmp_path
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=kvsched-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, cn in (("server", "localhost"), ("client", "worker-1")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            str(ext),
            "-out",
            str(d / f"{name}.pem"),
        )
    svc = Service(
        ServeConfig(
            listen="127.0.0.1:0",
            journal="memory",
            metrics_port=0,
            auth="none",
            tls_cert=str(d / "server.pem"),
            tls_key=str(d / "server.key"),
            tls_client_ca=str(d / "ca.pem"),
            grace_s=0.2,
        )
    )
    await svc.start()
    try:
        ca = (d / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(
            ca, (d / "client.key").read_bytes(), (d / "client.pem").read_bytes()
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{svc.port}", good) as ch:
            r = await admin_pb2_grpc.AdminServiceStub(ch).ListTenants(
                admin_pb2.ListTenantsRequest(), timeout=5
            )
            assert list(r.tenants) == []
        no_client_cert = grpc.ssl_channel_credentials(ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{svc.port}", no_client_cert) as ch:
            assert (
                await code_of(
                    admin_pb2_grpc.AdminServiceStub(ch).ListTenants(
                        admin_pb2.ListTenantsRequest(), timeout=5
                    )
                )
                == "UNAVAILABLE"
            )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            assert (
                await code_of(
                    admin_pb2_grpc.AdminServiceStub(ch).ListTenants(
                        admin_pb2.ListTenantsRequest(), timeout=5
                    )
                )
                == "UNAVAILABLE"
            )
    finally:
        await svc.stop()


def test_tokens_never_appear_in_logs(tmp_path: Path, port_factory: Callable[[], int]) -> None:
    import os
    import signal
    import sys
    import time

    port = port_factory()
    env = {**os.environ, "KVSCHED_LOG_JSON": "true", "KVSCHED_LOG_LEVEL": "debug"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsched",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--auth",
            "token",
            "--data-dir",
            str(tmp_path / "d"),
            "--metrics-port",
            "0",
            "--trace-console",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "bootstrap admin token" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
        token = line.rsplit(" ", 1)[-1].strip()
        assert token.startswith("kvs_")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            minted = admin.CreateToken(
                admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ROUTER),
                metadata=md(token),
                timeout=5,
            ).token
            with pytest.raises(grpc.RpcError):
                admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=md(minted), timeout=5)
            with pytest.raises(grpc.RpcError):
                admin.ListWorkers(
                    admin_pb2.ListWorkersRequest(), metadata=md(token + "x"), timeout=5
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    logs = err + out
    assert "server.stopped" in logs
    # kvs_<id>_<secret>: the secret itself may hold '_' (url-safe base64)
    secrets = [t.split("_", 2)[2] for t in (token, minted)]
    assert all(len(s) >= 32 for s in secrets)
    for secret in (token, minted, *secrets):
        assert secret not in logs
