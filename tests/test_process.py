"""The real ``kvsched serve`` process: signals, graceful drain, exit codes, config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def spawn(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KVSCHED_LOG_JSON": "true"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsched",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--metrics-port",
            "0",
            "--grace-s",
            "2",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_serving(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError("server did not become SERVING")


def test_sigterm_drains_streams_and_exits_zero(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    port = port_factory()
    proc = spawn(tmp_path, port)
    try:
        wait_serving(port)

        async def stream_until_drain() -> list[str]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                q: asyncio.Queue[worker_pb2.WorkerMessage | None] = asyncio.Queue()

                async def gen():  # type: ignore[no-untyped-def]
                    while (m := await q.get()) is not None:
                        yield m

                call = worker_pb2_grpc.WorkerServiceStub(ch).Connect(gen())
                await q.put(
                    worker_pb2.WorkerMessage(
                        seq=1,
                        hello=worker_pb2.Hello(
                            worker_id="w",
                            epoch=1,
                            cache_spec=types_pb2.CacheSpec(
                                block_size_tokens=16,
                                bytes_per_token=1,
                                gpu_capacity_blocks=10,
                                prefill_tokens_per_s=1.0,
                            ),
                        ),
                    )
                )
                kinds = [(await call.read()).WhichOneof("body")]
                proc.send_signal(signal.SIGTERM)
                while True:
                    m = await asyncio.wait_for(call.read(), 10)
                    if m is grpc.aio.EOF:
                        break
                    kinds.append(m.WhichOneof("body"))
                    if kinds[-1] == "drain":
                        await q.put(None)
                return kinds

        kinds = asyncio.run(stream_until_drain())
        assert kinds[0] == "welcome" and "drain" in kinds
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert '"event": "server.stopped"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_server_on_same_data_dir_is_refused(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    free_port = port_factory
    port = free_port()
    first = spawn(tmp_path, port)
    try:
        wait_serving(port)
        second = spawn(tmp_path, free_port())
        assert second.wait(timeout=30) == 2
        assert b"in use by another kvsched process" in (
            second.stderr.read() if second.stderr else b""
        )
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "kvsched.toml"
    cfg.write_text('[serve]\nlisten = "127.0.0.1:1"\nbogus = 3\n')
    r = subprocess.run(
        [sys.executable, "-m", "kvsched", "serve", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert b"unknown setting 'bogus'" in r.stderr


@pytest.mark.parametrize("flag", ["--journal=tape", "--tick-interval-s=0"])
def test_bad_flag_values_are_rejected(flag: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvsched", "serve", flag], cwd=ROOT, capture_output=True, timeout=60
    )
    assert r.returncode == 2
    assert flag.split("=")[0].lstrip("-").replace("-", "_") in r.stderr.decode()


def test_metrics_endpoint_exports_kvsched_instruments(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    import urllib.request

    from kvsched_client._proto.kvsched.v1 import placement_pb2
    from kvsched_client.connection import connect

    port, mport = port_factory(), port_factory()
    proc = spawn(tmp_path, port, "--metrics-port", str(mport))
    try:
        wait_serving(port)
        with connect(f"127.0.0.1:{port}") as conn:
            with pytest.raises(grpc.RpcError):  # no worker yet: UNAVAILABLE, still counted
                conn.placement.Place(placement_pb2.PlaceRequest(tenant_id="t"), timeout=2)
            with pytest.raises(grpc.RpcError):
                conn.placement.Place(placement_pb2.PlaceRequest(session_id="s"), timeout=2)
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        )
        lines = [ln for ln in body.splitlines() if ln.startswith("kvsched_rejected_inputs_total{")]
        assert len(lines) == 1 and 'code="INVALID_ARGUMENT"' in lines[0]
        assert lines[0].endswith(" 2.0")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_kvsched_top_renders_the_cluster(tmp_path: Path, port_factory: Callable[[], int]) -> None:
    port = port_factory()
    proc = spawn(tmp_path, port)
    try:
        wait_serving(port)
        from kvsched_client._proto.kvsched.v1 import admin_pb2
        from kvsched_client.connection import connect

        with connect(f"127.0.0.1:{port}") as conn:
            conn.admin.CreateTenant(
                admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(tenant_id="acme")), timeout=5
            )
        r = subprocess.run(
            [sys.executable, "-m", "kvsched", "top", "--target", f"127.0.0.1:{port}", "--once"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "140"},
        )
        assert r.returncode == 0, r.stderr
        assert "leader epoch 1" in r.stdout and "workers 0/0" in r.stdout
        assert "acme" in r.stdout and "KV on GPU" in r.stdout and "0.0 GiB" in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
