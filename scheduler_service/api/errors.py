"""gRPC errors with google.rpc details (BadRequest, ErrorInfo, RetryInfo)."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "kvsched.dev"
RESYNC_REQUIRED = "RESYNC_REQUIRED"


def _status(code: int, message: str, *details: object) -> grpc.Status:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)  # type: ignore[arg-type]
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def invalid_argument(field: str, description: str) -> grpc.Status:
    """INVALID_ARGUMENT naming the offending field in a BadRequest detail."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        ]
    )
    return _status(code_pb2.INVALID_ARGUMENT, f"invalid {field}: {description}", bad)


def resync_required(message: str, **metadata: str) -> grpc.Status:
    """FAILED_PRECONDITION with ErrorInfo reason RESYNC_REQUIRED."""
    info = error_details_pb2.ErrorInfo(
        reason=RESYNC_REQUIRED, domain=ERROR_DOMAIN, metadata=metadata
    )
    return _status(code_pb2.FAILED_PRECONDITION, message, info)


def unavailable(message: str, retry_after_s: float = 1.0) -> grpc.Status:
    """UNAVAILABLE with a RetryInfo hint (draining, no live worker)."""
    retry = error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s))
    return _status(code_pb2.UNAVAILABLE, message, retry)


def resource_exhausted(message: str, retry_after_s: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED with RetryInfo (overload, quota)."""
    retry = error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s))
    return _status(code_pb2.RESOURCE_EXHAUSTED, message, retry)


def not_found(what: str, ident: str) -> grpc.Status:
    """NOT_FOUND for an unknown resource."""
    info = error_details_pb2.ResourceInfo(resource_type=what, resource_name=ident)
    return _status(code_pb2.NOT_FOUND, f"{what} {ident!r} not found", info)


def already_exists(what: str, ident: str) -> grpc.Status:
    """ALREADY_EXISTS for a duplicate create."""
    info = error_details_pb2.ResourceInfo(resource_type=what, resource_name=ident)
    return _status(code_pb2.ALREADY_EXISTS, f"{what} {ident!r} already exists", info)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


async def abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> NoReturn:
    """Abort the RPC with ``status`` (never returns)."""
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def unauthenticated(message: str) -> grpc.Status:
    """UNAUTHENTICATED: no usable credentials."""
    info = error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain=ERROR_DOMAIN)
    return _status(code_pb2.UNAUTHENTICATED, message, info)


def permission_denied(message: str) -> grpc.Status:
    """PERMISSION_DENIED: authenticated, but not allowed to do this."""
    info = error_details_pb2.ErrorInfo(reason="PERMISSION_DENIED", domain=ERROR_DOMAIN)
    return _status(code_pb2.PERMISSION_DENIED, message, info)
