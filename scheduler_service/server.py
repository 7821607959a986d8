"""Wiring: the grpc.aio server, health, reflection, telemetry, ticks, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import time
from pathlib import Path
from typing import IO

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvsched_client._proto.kvsched.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from scheduler_service.api.admin_service import AdminServicer
from scheduler_service.api.auth import Authorizer, Role
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.api.placement_service import PlacementServicer
from scheduler_service.api.worker_service import WorkerServicer
from scheduler_service.config import ServeConfig
from scheduler_service.engine import Engine
from scheduler_service.ha import HaController
from scheduler_service.journal import Journal, MemoryJournal
from scheduler_service.journal.redis import LeaderLease, RedisJournal
from scheduler_service.journal.sqlite import SqliteJournal
from scheduler_service.telemetry import Metrics, configure_logging, configure_otel

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    placement_pb2.DESCRIPTOR.services_by_name["PlacementService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class ServiceClock:
    """Seconds that never go backwards, even across restarts (floor = last journaled now)."""

    def __init__(self, floor: float = 0.0) -> None:
        self._base = max(time.time(), floor + 1e-3)
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        return self._base + (time.perf_counter() - self._t0)


class Service:
    """A running kvsched: build with ``start``, stop with ``stop``."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics.create()
        self.port = 0
        self._lock: IO[str] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.dispatcher: Dispatcher | None = None
        self.journal: Journal | None = None
        self.ha: HaController | None = None
        self._ha_task: asyncio.Task[None] | None = None
        self._lease: LeaderLease | None = None
        self.stop_requested = asyncio.Event()
        self.exit_code = 0

    async def start(self) -> int:
        """Recover state, bind, serve; returns the bound port."""
        cfg = self.config
        server_id = cfg.server_id or f"{socket.gethostname()}:{os.getpid()}"
        journal: Journal
        if cfg.journal == "redis":
            rj = RedisJournal(cfg.redis_url, cfg.cell, wait_replicas=cfg.redis_wait_replicas)
            self._lease = rj.lease = LeaderLease(rj.client, cfg.cell, cfg.lease_ttl_s, server_id)
            journal = rj
        elif cfg.journal == "sqlite":
            data_dir = Path(cfg.data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = _lock_data_dir(data_dir)
            journal = SqliteJournal(data_dir, synchronous=cfg.journal_synchronous.upper())
        else:
            journal = MemoryJournal()
        self.journal = journal
        engine = Engine()
        warm = getattr(engine, "warm", None)
        if callable(warm):
            warm()  # numba kernels compile (or load from cache) before the first request
        self.dispatcher = Dispatcher(engine, journal, self.metrics, cfg.max_pending_appends)
        report = self.dispatcher.replay()
        self.clock = ServiceClock(report.last_now)
        started_at = self.clock()

        interceptors = []
        if cfg.trace_console:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

            # NOTE: the aio interceptor attaches its span context around an async
            # generator, which breaks contextvars when the stream yields; the Connect
            # stream therefore opens its own span (see WorkerServicer) and is excluded.
            # Only installed when spans are exported: otherwise it is ~150 µs of
            # a Place's server time spent on spans nobody reads.
            interceptors.append(
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    filter_=filters.negate(
                        filters.full_method_name("/kvsched.v1.WorkerService/Connect")
                    )
                )
            )
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
            ],
        )
        d = self.dispatcher
        authz = Authorizer(lambda: d.tokens, enabled=cfg.auth == "token")
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(d, self.clock, server_id, authz), server
        )
        placement_pb2_grpc.add_PlacementServiceServicer_to_server(
            PlacementServicer(d, self.clock, authz), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(d, self.clock, started_at, authz), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self._server = server
        if isinstance(journal, RedisJournal):
            # NOTE: a standby does not even bind its port until promoted, so clients
            # given every replica (``ipv4:a:50051,b:50051``, gRPC pick_first) reach
            # whichever replica is the leader, with no client-side logic.
            assert self._lease is not None
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.ha = HaController(
                self.dispatcher,
                journal,
                self._lease,
                self.clock,
                on_promoted=self._serve_as_leader,
                on_deposed=self._deposed,
            )
            self._ha_task = asyncio.create_task(self.ha.run())
            self._ha_task.add_done_callback(self._ha_done)
        else:
            await self._serve_as_leader()
        log.info(
            "server.started",
            role="standby" if self.ha is not None else "leader",
            server_id=server_id,
            replayed=report.records,
            dropped=report.dropped,
        )
        return self.port

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes()
                if cfg.tls_client_ca
                else None,
                require_client_auth=bool(cfg.tls_client_ca),
            )
            port = server.add_secure_port(cfg.listen, creds)
        else:
            port = server.add_insecure_port(cfg.listen)
        if port == 0:
            raise OSError(f"could not bind {cfg.listen}")
        return int(port)

    async def _serve_as_leader(self) -> None:
        assert self._server is not None
        self.port = self._bind(self._server)
        await self._server.start()
        host = self.config.listen.rsplit(":", 1)[0]
        log.info("server.serving", listen=f"{host}:{self.port}")
        print(f"kvsched listening on {host}:{self.port}", flush=True)
        if self.config.auth == "token":
            await self._bootstrap_admin()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._tick_task = asyncio.create_task(self._tick_loop())

    async def _bootstrap_admin(self) -> None:
        """First start with auth on: create the admin token, print it once (never log it)."""
        d = self.dispatcher
        assert d is not None
        if d.tokens.has_admin():
            return
        cfg = self.config
        given = os.environ.pop("KVSCHED_ADMIN_TOKEN", "") or (
            Path(cfg.admin_token_file).read_text().strip() if cfg.admin_token_file else ""
        )
        _, token, durable = d.create_token(
            Role.ADMIN, "", "bootstrap admin", self.clock(), token=given or None
        )
        await durable
        if not given:
            print(f"kvsched bootstrap admin token (shown once, store it now): {token}", flush=True)
        log.info("auth.bootstrap_admin_created", source="given" if given else "generated")

    def _ha_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("ha.failed", error=repr(exc))
            self._deposed(1)

    def _deposed(self, code: int) -> None:
        self.exit_code = code
        self.stop_requested.set()

    async def _tick_loop(self) -> None:
        d = self.dispatcher
        assert d is not None
        cfg = self.config
        last_snapshot = self.clock()
        while True:
            await asyncio.sleep(cfg.tick_interval_s)
            now = self.clock()
            applied = d.tick(now)
            await applied.durable
            d.route(applied.decisions)
            due = now - last_snapshot >= cfg.snapshot_interval_s and d.appends_since_snapshot > 0
            if due or d.appends_since_snapshot >= cfg.snapshot_every_records:
                await d.snapshot(now)
                last_snapshot = now

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, Drain to every stream, stop(grace), flush the journal."""
        assert self._server is not None and self.dispatcher is not None
        grace = self.config.grace_s
        self.dispatcher.draining = True
        await self._health.enter_graceful_shutdown()
        self.dispatcher.broadcast_drain("scheduler shutting down", grace)
        for task in (self._tick_task, self._ha_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._server.stop(grace)
        leader = self.ha is None or self.ha.is_leader
        if self.journal is not None:
            if leader:
                # A final snapshot makes the next start a load instead of a long replay.
                with contextlib.suppress(Exception):
                    await self.dispatcher.snapshot(self.clock())
            if self._lease is not None and leader:
                await self._lease.release()  # a standby takes over at once
            await self.journal.close()
        if self._lock is not None:
            self._lock.close()
        log.info("server.stopped")


def _lock_data_dir(data_dir: Path) -> IO[str]:
    fh = (data_dir / "LOCK").open("w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RuntimeError(f"data dir {data_dir} is in use by another kvsched process") from None
    return fh


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit code."""
    configure_logging(config.log_level, config.log_json)
    metrics = configure_otel(config.metrics_port or None, config.metrics_host, config.trace_console)
    service = Service(config, metrics)
    await service.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop_requested.set)
    await service.stop_requested.wait()
    log.info("server.stopping", exit_code=service.exit_code)
    await service.stop()
    return service.exit_code
