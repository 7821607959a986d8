"""PlacementService: Place on the router's critical path, ReportSessionEvents."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc
from scheduler_service.api import convert, errors
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.domain import Rejected


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    """Thin: validate, convert, ask the engine, convert back."""

    def __init__(self, dispatcher: Dispatcher, clock: Callable[[], float]) -> None:
        self._d = dispatcher
        self._clock = clock

    async def Place(
        self, request: placement_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PlaceResponse:
        t0 = time.perf_counter()
        try:
            req = convert.place_request_from_pb(request)
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        placement = self._d.engine.place(req, self._clock())
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
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        if self._d.overloaded():
            self._d.metrics.rejected.add(1, {"code": "RESOURCE_EXHAUSTED"})
            await errors.abort(
                context, errors.resource_exhausted("journal is behind; retry shortly", 0.5)
            )
        try:
            accepted, dups, applied = self._d.report_events(request, self._clock())
        except Rejected as r:
            self._d.metrics.rejected.add(1, {"code": "INVALID_ARGUMENT"})
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await applied.durable
        self._d.route(applied.decisions)
        return placement_pb2.ReportSessionEventsResponse(accepted=accepted, duplicates=dups)
