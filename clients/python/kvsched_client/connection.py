"""``connect()``: a channel to kvsched with typed stubs for its three services."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from kvsched_client._proto.kvsched.v1 import admin_pb2_grpc, placement_pb2_grpc, worker_pb2_grpc

#: Channel options that suit a long-lived worker stream and small, frequent RPCs.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)


@dataclass(frozen=True, slots=True)
class Connection:
    """A channel and the stubs bound to it; close the channel when done."""

    channel: grpc.Channel
    worker: worker_pb2_grpc.WorkerServiceStub
    placement: placement_pb2_grpc.PlacementServiceStub
    admin: admin_pb2_grpc.AdminServiceStub

    def close(self) -> None:
        """Close the underlying channel."""
        self.channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class AsyncConnection:
    """The asyncio flavour of ``Connection``."""

    channel: grpc.aio.Channel
    worker: worker_pb2_grpc.WorkerServiceStub
    placement: placement_pb2_grpc.PlacementServiceStub
    admin: admin_pb2_grpc.AdminServiceStub

    async def close(self) -> None:
        """Close the underlying channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS,
) -> Connection:
    """A blocking channel to ``target`` ("host:port"); TLS when ``credentials`` is given."""
    ch = (
        grpc.secure_channel(target, credentials, options=list(options))
        if credentials is not None
        else grpc.insecure_channel(target, options=list(options))
    )
    return Connection(
        ch,
        worker_pb2_grpc.WorkerServiceStub(ch),
        placement_pb2_grpc.PlacementServiceStub(ch),
        admin_pb2_grpc.AdminServiceStub(ch),
    )


def aconnect(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS,
) -> AsyncConnection:
    """An asyncio channel to ``target``; TLS when ``credentials`` is given."""
    ch = (
        grpc.aio.secure_channel(target, credentials, options=list(options))
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=list(options))
    )
    return AsyncConnection(
        ch,
        worker_pb2_grpc.WorkerServiceStub(ch),
        placement_pb2_grpc.PlacementServiceStub(ch),
        admin_pb2_grpc.AdminServiceStub(ch),
    )
