"""AdminService: tenants, workers, sessions, cluster stats and tokens.

Admins may do everything; a tenant-admin token sees and manages only its own
tenant (another tenant's sessions read as NOT_FOUND, so existence never leaks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import grpc

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc, worker_pb2
from scheduler_service.api import convert, errors
from scheduler_service.api.auth import (
    ADMINS_ONLY,
    TENANT_ADMINS,
    Authorizer,
    Principal,
    Role,
    StoredToken,
)
from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.domain import Rejected, SessionId, TenantSpec, WorkerId, WorkerView
from scheduler_service.journal import RecordKind

#: Tenant fields a tenant-admin may change on its own tenant (the rest is the operator's).
SELF_SERVICE_FIELDS = frozenset({"display_name", "slo_class"})

Ctx: TypeAlias = grpc.aio.ServicerContext


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operator API; mutations are journaled like everything else."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: Callable[[], float],
        started_at: float,
        authz: Authorizer,
    ) -> None:
        self._d = dispatcher
        self._clock = clock
        self._started_at = started_at
        self._authz = authz

    async def _serving(self, context: Ctx) -> None:
        if (reason := self._d.unavailable_reason) is not None:
            await errors.abort(context, errors.unavailable(reason, 1.0))

    async def _mutate(self, kind: RecordKind, pb: object, context: Ctx) -> object:
        await self._serving(context)
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

    # -- tenants -----------------------------------------------------------------------

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: Ctx
    ) -> admin_pb2.Tenant:
        await self._authz.require(context, ADMINS_ONLY, "AdminService.CreateTenant")
        spec = await self._mutate(RecordKind.TENANT_CREATE, request.tenant, context)
        assert isinstance(spec, TenantSpec)
        return convert.tenant_to_pb(spec)

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: Ctx
    ) -> admin_pb2.Tenant:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.GetTenant")
        try:
            tid = convert.tenant_id_from_pb(request.tenant_id)
        except Rejected as r:
            await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await self._authz.same_tenant(context, p, tid, "tenant_id")
        spec = self._d.engine.get_tenant(tid)
        if spec is None:
            await errors.abort(context, errors.not_found("tenant", tid))
        return convert.tenant_to_pb(spec)

    async def UpdateTenant(
        self, request: admin_pb2.UpdateTenantRequest, context: Ctx
    ) -> admin_pb2.Tenant:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.UpdateTenant")
        await self._authz.same_tenant(context, p, request.tenant.tenant_id, "tenant.tenant_id")
        if p.role is not Role.ADMIN:
            paths = set(request.update_mask.paths)
            if not paths or not paths <= SELF_SERVICE_FIELDS:
                await errors.abort(
                    context,
                    errors.permission_denied(
                        "update_mask: a tenant-admin may only update "
                        + ", ".join(sorted(SELF_SERVICE_FIELDS))
                    ),
                )
        spec = await self._mutate(RecordKind.TENANT_UPDATE, request, context)
        assert isinstance(spec, TenantSpec)
        return convert.tenant_to_pb(spec)

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Ctx
    ) -> admin_pb2.ListTenantsResponse:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.ListTenants")
        return admin_pb2.ListTenantsResponse(
            tenants=[
                convert.tenant_to_pb(t)
                for t in self._d.engine.list_tenants()
                if not p.confined_to_other(t.tenant_id)
            ]
        )

    async def DeleteTenant(
        self, request: admin_pb2.DeleteTenantRequest, context: Ctx
    ) -> admin_pb2.DeleteTenantResponse:
        await self._authz.require(context, ADMINS_ONLY, "AdminService.DeleteTenant")
        deleted = await self._mutate(RecordKind.TENANT_DELETE, request, context)
        return admin_pb2.DeleteTenantResponse(deleted=bool(deleted))

    # -- workers and sessions -----------------------------------------------------------

    async def ListWorkers(
        self, request: admin_pb2.ListWorkersRequest, context: Ctx
    ) -> admin_pb2.ListWorkersResponse:
        await self._authz.require(context, ADMINS_ONLY, "AdminService.ListWorkers")
        return admin_pb2.ListWorkersResponse(
            workers=[convert.worker_to_pb(w) for w in self._d.engine.worker_views()]
        )

    async def DrainWorker(
        self, request: admin_pb2.DrainWorkerRequest, context: Ctx
    ) -> admin_pb2.WorkerInfo:
        await self._authz.require(context, ADMINS_ONLY, "AdminService.DrainWorker")
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
        self, request: admin_pb2.GetSessionRequest, context: Ctx
    ) -> admin_pb2.SessionInfo:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.GetSession")
        if not request.session_id:
            await errors.abort(context, errors.invalid_argument("session_id", "must not be empty"))
        view = self._d.engine.session_view(SessionId(request.session_id), self._clock())
        if view is None or p.confined_to_other(view.tenant_id):
            await errors.abort(context, errors.not_found("session", request.session_id))
        return convert.session_to_pb(view)

    async def GetClusterStats(
        self, request: admin_pb2.GetClusterStatsRequest, context: Ctx
    ) -> admin_pb2.ClusterStats:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.GetClusterStats")
        now = self._clock()
        stats = convert.stats_to_pb(self._d.engine.stats(now), now - self._started_at)
        if p.tenant_id:
            # A confined caller sees fleet capacity and its own tenant, nothing of others.
            own = [t for t in stats.tenants if t.tenant_id == p.tenant_id]
            for name in (
                "sessions_running",
                "sessions_tool_wait",
                "sessions_idle",
                "events_total",
                "placements_total",
                "directives_total",
            ):
                stats.ClearField(name)
            del stats.tenants[:]
            stats.tenants.extend(own)
        return stats

    # -- tokens -----------------------------------------------------------------------------

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.CreateToken")
        await self._serving(context)
        if request.role not in {r.value for r in Role}:
            await errors.abort(context, errors.invalid_argument("role", "a role is required"))
        role = Role(request.role)
        tenant = request.tenant_id or p.tenant_id
        if tenant:
            try:
                convert.tenant_id_from_pb(tenant)
            except Rejected as r:
                await errors.abort(context, errors.invalid_argument(r.field, r.description))
        await self._authz.same_tenant(context, p, tenant, "tenant_id")
        if p.role is not Role.ADMIN and role is Role.ADMIN:
            await errors.abort(
                context, errors.permission_denied("role: only an admin may mint admin tokens")
            )
        if role is Role.TENANT_ADMIN and not tenant:
            await errors.abort(
                context, errors.invalid_argument("tenant_id", "required for a tenant-admin token")
            )
        if len(request.description.encode()) > 256:
            await errors.abort(
                context, errors.invalid_argument("description", "must be at most 256 bytes")
            )
        stored, token, durable = self._d.create_token(
            role, tenant, request.description, self._clock()
        )
        await durable
        return admin_pb2.CreateTokenResponse(info=_token_info(stored), token=token)

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.ListTokens")
        return admin_pb2.ListTokensResponse(
            tokens=[
                _token_info(t)
                for t in sorted(self._d.tokens.tokens.values(), key=lambda t: t.token_id)
                if _visible(p, t)
            ]
        )

    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Ctx
    ) -> admin_pb2.RevokeTokenResponse:
        p = await self._authz.require(context, TENANT_ADMINS, "AdminService.RevokeToken")
        await self._serving(context)
        t = self._d.tokens.tokens.get(request.token_id)
        if t is None or not _visible(p, t):
            await errors.abort(context, errors.not_found("token", request.token_id))
        revoked, durable = self._d.revoke_token(request.token_id, self._clock())
        await durable
        return admin_pb2.RevokeTokenResponse(revoked=revoked)


def _visible(p: Principal, t: StoredToken) -> bool:
    return (p.role is Role.ADMIN and not p.tenant_id) or (
        bool(p.tenant_id) and t.tenant_id == p.tenant_id
    )


def _token_info(t: StoredToken) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        token_id=t.token_id,
        role=int(t.role),
        tenant_id=t.tenant_id,
        description=t.description,
        created_at_s=t.created_at_s,
        worker_ids=sorted(t.worker_ids),
    )
