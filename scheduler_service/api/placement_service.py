"""PlacementService: Place on the router's critical path, ReportSessionEvents."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc
from scheduler_service.api import convert, errors
from scheduler_service.api.auth import ROUTERS, WORKERS, Authorizer, Role
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.api.ratelimit import TenantRateLimiter
from scheduler_service.domain import Rejected, TenantId, TenantLimitExceeded

#: RetryInfo of a Place refused at a tenant's session limit: about one agent step.
SESSION_LIMIT_RETRY_S = 1.0


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    """Thin: validate, convert, ask the engine, convert back."""

    def __init__(
        self, dispatcher: Dispatcher, clock: Callable[[], float], authz: Authorizer
    ) -> None:
        self._d = dispatcher
        self._clock = clock
        self._authz = authz
        self._limiter = TenantRateLimiter(lambda t: self._d.engine.get_tenant(t))

    async def _admit(self, context: grpc.aio.ServicerContext, tenant: str, cost: float) -> None:
        wait_s = self._limiter.admit(TenantId(tenant), cost, self._clock())
        if wait_s is not None:
            self._d.metrics.rejected.add(1, {"code": "RESOURCE_EXHAUSTED"})
            await errors.abort(
                context,
                errors.resource_exhausted(
                    f"tenant {tenant!r} is over its event rate limit", wait_s
                ),
            )

    async def Place(
        self, request: placement_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PlaceResponse:
        t0 = time.perf_counter()
        p = await self._authz.require(context, ROUTERS, "PlacementService.Place")
        try:
            req = convert.place_request_from_pb(request)
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await self._authz.same_tenant(context, p, req.tenant_id, "tenant_id")
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        await self._admit(context, req.tenant_id, 1.0)
        try:
            placement = self._d.engine.place(req, self._clock())
        except TenantLimitExceeded as e:
            self._d.metrics.rejected.add(1, {"code": "RESOURCE_EXHAUSTED"})
            await errors.abort(
                context,
                errors.resource_exhausted(
                    f"tenant {e.tenant_id!r} has {e.current} live sessions, at its"
                    f" {e.limit_name} limit of {e.limit}: session {req.session_id!r}"
                    " cannot start until one finishes",
                    SESSION_LIMIT_RETRY_S,
                ),
            )
        if not placement.candidates:
            await errors.abort(
                context, errors.unavailable("no live worker can take this step", 0.5)
            )
        resp = convert.placement_to_pb(placement)
        self._d.metrics.place_latency_s.record(time.perf_counter() - t0)
        return resp

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
            await self._admit(context, tenant, float(n))
        try:
            accepted, dups, applied = self._d.report_events(request, self._clock())
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await applied.durable
        self._d.route(applied.decisions)
        return placement_pb2.ReportSessionEventsResponse(accepted=accepted, duplicates=dups)
