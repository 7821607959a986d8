"""Shared fixtures: a real kvsched server on a loopback port."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from scheduler_service.config import ServeConfig
from scheduler_service.server import Service

# Servers the tests start as subprocesses run without authentication unless a
# test asks for it (--auth token beats the environment); test_auth covers auth.
os.environ.setdefault("KVSCHED_AUTH", "none")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def service(data_dir: Path) -> AsyncIterator[Service]:
    """A started in-process server (SQLite journal) on a free loopback port."""
    cfg = ServeConfig(
        auth="none",
        listen="127.0.0.1:0",
        data_dir=str(data_dir),
        metrics_port=0,
        grace_s=0.5,
        tick_interval_s=0.05,
    )
    svc = Service(cfg)
    await svc.start()
    yield svc
    if not svc.dispatcher or not svc.dispatcher.draining:
        await svc.stop()


@pytest.fixture
async def channel(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture
def port_factory() -> object:
    """A callable returning a free loopback TCP port."""
    return free_port


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
