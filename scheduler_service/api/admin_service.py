"""AdminService: tenants, workers, sessions and cluster stats."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc, worker_pb2
from scheduler_service.api import convert, errors
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.domain import Rejected, SessionId, TenantSpec, WorkerId, WorkerView
from scheduler_service.journal import RecordKind


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operator API; mutations are journaled like everything else."""

    def __init__(
        self, dispatcher: Dispatcher, clock: Callable[[], float], started_at: float
    ) -> None:
        self._d = dispatcher
        self._clock = clock
        self._started_at = started_at

    async def _mutate(
        self, kind: RecordKind, pb: object, context: grpc.aio.ServicerContext
    ) -> object:
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))
        try:
            result, durable = self._d.admin(kind, pb, self._clock())
        except Rejected as r:
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        except FileExistsError as e:
            await errors.abort(context, errors.already_exists("tenant", str(e)))
        except KeyError as e:
            what = "worker" if kind is RecordKind.DRAIN_WORKER else "tenant"
            await errors.abort(context, errors.not_found(what, str(e.args[0])))
        await durable
        return result

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Tenant:
        spec = await self._mutate(RecordKind.TENANT_CREATE, request.tenant, context)
        assert isinstance(spec, TenantSpec)
        return convert.tenant_to_pb(spec)

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Tenant:
        try:
            tid = convert.tenant_id_from_pb(request.tenant_id)
        except Rejected as r:
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        spec = self._d.engine.get_tenant(tid)
        if spec is None:
            await errors.abort(context, errors.not_found("tenant", tid))
        return convert.tenant_to_pb(spec)

    async def UpdateTenant(
        self, request: admin_pb2.UpdateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Tenant:
        spec = await self._mutate(RecordKind.TENANT_UPDATE, request, context)
        assert isinstance(spec, TenantSpec)
        return convert.tenant_to_pb(spec)

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        return admin_pb2.ListTenantsResponse(
            tenants=[convert.tenant_to_pb(t) for t in self._d.engine.list_tenants()]
        )

    async def DeleteTenant(
        self, request: admin_pb2.DeleteTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteTenantResponse:
        deleted = await self._mutate(RecordKind.TENANT_DELETE, request, context)
        return admin_pb2.DeleteTenantResponse(deleted=bool(deleted))

    async def ListWorkers(
        self, request: admin_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListWorkersResponse:
        return admin_pb2.ListWorkersResponse(
            workers=[convert.worker_to_pb(w) for w in self._d.engine.worker_views()]
        )

    async def DrainWorker(
        self, request: admin_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.WorkerInfo:
        if not request.worker_id:
            await errors.abort(context, errors.invalid_argument("worker_id", "must not be empty"))
        view = await self._mutate(RecordKind.DRAIN_WORKER, request, context)
        assert isinstance(view, WorkerView)
        handle = self._d.stream_for(WorkerId(request.worker_id))
        if handle is not None:
            handle.send(
                worker_pb2.ServerMessage(
                    drain=worker_pb2.Drain(
                        reason=request.reason or "drained by operator", worker_drained=True
                    )
                )
            )
        return convert.worker_to_pb(view)

    async def GetSession(
        self, request: admin_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SessionInfo:
        if not request.session_id:
            await errors.abort(context, errors.invalid_argument("session_id", "must not be empty"))
        view = self._d.engine.session_view(SessionId(request.session_id), self._clock())
        if view is None:
            await errors.abort(context, errors.not_found("session", request.session_id))
        return convert.session_to_pb(view)

    async def GetClusterStats(
        self, request: admin_pb2.GetClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClusterStats:
        now = self._clock()
        return convert.stats_to_pb(self._d.engine.stats(now), now - self._started_at)
