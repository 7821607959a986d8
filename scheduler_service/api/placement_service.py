"""PlacementService: Place on the router's critical path, ReportSessionEvents."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc
from scheduler_service.api import convert, errors
from scheduler_service.api.auth import ROUTERS, WORKERS, Authorizer, Principal, Role
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.api.ratelimit import TenantRateLimiter
from scheduler_service.domain import Rejected, TenantId, TenantLimitExceeded

#: RetryInfo of a Place refused at a tenant's session limit: about one agent step.
SESSION_LIMIT_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a Place request is refused: a status for Place, a PlaceError for PlaceStream."""

    code: int  # google.rpc.Code
    message: str
    field: str = ""
    retry_s: float = 0.0

    def status(self) -> grpc.Status:
        if self.code == code_pb2.INVALID_ARGUMENT:
            return errors.invalid_argument(self.field, self.message)
        if self.code == code_pb2.PERMISSION_DENIED:
            return errors.permission_denied(f"{self.field}: {self.message}")
        if self.code == code_pb2.RESOURCE_EXHAUSTED:
            return errors.resource_exhausted(self.message, self.retry_s)
        return errors.unavailable(self.message, self.retry_s)

    def pb(self) -> placement_pb2.PlaceError:
        # the same words as the status Place ends with (errors.py writes them)
        return placement_pb2.PlaceError(
            code=self.code,
            message=self.status().details,
            field=f"request.{self.field}" if self.field else "",
            retry_delay_s=self.retry_s,
        )


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    """Thin: validate, convert, ask the engine, convert back."""

    def __init__(
        self, dispatcher: Dispatcher, clock: Callable[[], float], authz: Authorizer
    ) -> None:
        self._d = dispatcher
        self._clock = clock
        self._authz = authz
        self._limiter = TenantRateLimiter(lambda t: self._d.engine.get_tenant(t))

    def _admit(self, tenant: str, cost: float) -> _Refusal | None:
        wait_s = self._limiter.admit(TenantId(tenant), cost, self._clock())
        if wait_s is None:
            return None
        return _Refusal(
            code_pb2.RESOURCE_EXHAUSTED,
            f"tenant {tenant!r} is over its event rate limit",
            retry_s=wait_s,
        )

    def _place(
        self, p: Principal, request: placement_pb2.PlaceRequest
    ) -> placement_pb2.PlaceResponse | _Refusal:
        """What Place answers for ``request`` from ``p``, or why it is refused."""
        t0 = time.perf_counter()
        try:
            req = convert.place_request_from_pb(request)
        except Rejected as r:
            return _Refusal(code_pb2.INVALID_ARGUMENT, r.description, field=r.field)
        if p.confined_to_other(req.tenant_id):
            return _Refusal(code_pb2.PERMISSION_DENIED, p.confinement(), field="tenant_id")
        if (reason := self._d.unavailable_reason) is not None:
            return _Refusal(code_pb2.UNAVAILABLE, reason, retry_s=1.0)
        if (refused := self._admit(req.tenant_id, 1.0)) is not None:
            return refused
        try:
            placement = self._d.engine.place(req, self._clock())
        except TenantLimitExceeded as e:
            return _Refusal(
                code_pb2.RESOURCE_EXHAUSTED,
                f"tenant {e.tenant_id!r} has {e.current} live sessions, at its"
                f" {e.limit_name} limit of {e.limit}: session {req.session_id!r}"
                " cannot start until one finishes",
                retry_s=SESSION_LIMIT_RETRY_S,
            )
        if not placement.candidates:
            return _Refusal(code_pb2.UNAVAILABLE, "no live worker can take this step", retry_s=0.5)
        resp = convert.placement_to_pb(placement)
        self._d.metrics.place_latency_s.record(time.perf_counter() - t0)
        return resp

    def _refused(self, r: _Refusal) -> None:
        if r.code in (code_pb2.INVALID_ARGUMENT, code_pb2.RESOURCE_EXHAUSTED):
            self._d.metrics.rejected.add(1, {"code": code_pb2.Code.Name(r.code)})

    async def Place(
        self, request: placement_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PlaceResponse:
        p = await self._authz.require(context, ROUTERS, "PlacementService.Place")
        out = self._place(p, request)
        if isinstance(out, _Refusal):
            self._refused(out)
            await errors.abort(context, out.status())
        return out

    async def PlaceStream(
        self,
        request_iterator: AsyncIterator[placement_pb2.PlaceStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[placement_pb2.PlaceStreamResponse]:
        what = "PlacementService.PlaceStream"
        p = await self._authz.require(context, ROUTERS, what)
        async for msg in request_iterator:
            if self._authz.enabled:
                # NOTE: per request, so a revoked token's open stream ends at its next call
                p = await self._authz.require(context, ROUTERS, what)
            out = self._place(p, msg.request)
            if isinstance(out, _Refusal):
                self._refused(out)
                yield placement_pb2.PlaceStreamResponse(request_id=msg.request_id, error=out.pb())
            else:
                yield placement_pb2.PlaceStreamResponse(request_id=msg.request_id, placement=out)

    async def ReportSessionEvents(
        self,
        request: placement_pb2.ReportSessionEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> placement_pb2.ReportSessionEventsResponse:
        p = await self._authz.require(context, WORKERS, "PlacementService.ReportSessionEvents")
        for i, ev in enumerate(request.events):
            await self._authz.same_tenant(context, p, ev.tenant_id, f"events[{i}].tenant_id")
        if p.role is Role.WORKER:
            bound = self._d.tokens.bound_to(request.worker_id)
            if bound is not None and bound != p.token_id:
                await errors.abort(
                    context, errors.permission_denied("worker_id: registered to another token")
                )
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        if self._d.overloaded():
            self._d.metrics.rejected.add(1, {"code": "RESOURCE_EXHAUSTED"})
            await errors.abort(
                context, errors.resource_exhausted("journal is behind; retry shortly", 0.5)
            )
        per_tenant: dict[str, int] = {}
        for ev in request.events:
            per_tenant[ev.tenant_id] = per_tenant.get(ev.tenant_id, 0) + 1
        for tenant, n in per_tenant.items():
            if (refused := self._admit(tenant, float(n))) is not None:
                self._refused(refused)
                await errors.abort(context, refused.status())
        try:
            accepted, dups, applied = self._d.report_events(request, self._clock())
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await applied.durable
        self._d.route(applied.decisions)
        return placement_pb2.ReportSessionEventsResponse(accepted=accepted, duplicates=dups)
