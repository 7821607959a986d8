"""Bearer tokens and roles.

A token reads ``kvs_<id>_<secret>``. Only the id and an scrypt digest of the
secret are kept (and journaled); a verified token is cached in memory by its
SHA-256 so scrypt runs once per token, not per RPC. Tokens are never logged.

Roles: ``worker`` streams events for the workers it registered (the first
Hello with a worker_id binds it), ``router`` calls Place, ``tenant-admin``
reads and manages its own tenant, ``admin`` does everything. A token may be
confined to one tenant; a confined token can neither read nor affect another
tenant's sessions, quotas or stats.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import grpc

from scheduler_service.api import errors

TOKEN_PREFIX = "kvs_"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_CACHE_LIMIT = 100_000


class Role(IntEnum):
    """kvsched.v1.Role."""

    WORKER = 1
    ROUTER = 2
    TENANT_ADMIN = 3
    ADMIN = 4


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's id, role and tenant ("" = fleet-wide)."""

    token_id: str
    role: Role
    tenant_id: str = ""

    def confined_to_other(self, tenant_id: str) -> bool:
        """True when this principal is confined to a tenant other than ``tenant_id``."""
        return bool(self.tenant_id) and self.tenant_id != tenant_id

    def confinement(self) -> str:
        """Why a call for another tenant is refused (PERMISSION_DENIED's words)."""
        return f"this token is confined to tenant {self.tenant_id!r}"


#: The principal of every call when authentication is off.
UNAUTHENTICATED_ADMIN = Principal("", Role.ADMIN, "")


@dataclass(slots=True)
class StoredToken:
    """A token as persisted: never the secret."""

    token_id: str
    role: Role
    tenant_id: str
    description: str
    created_at_s: float
    salt: bytes
    digest: bytes
    worker_ids: set[str] = field(default_factory=set)


def _digest(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    rest = token[len(TOKEN_PREFIX) :]
    tid, sep, secret = rest.partition("_")
    if not sep or not tid or len(secret) < 16:
        return None
    return tid, secret


def new_token() -> str:
    """A fresh random token string."""
    return f"{TOKEN_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"


def create_record(token: str, role: Role, tenant_id: str, description: str, now: float) -> bytes:
    """Journal payload for a new token: the id, role, tenant and an scrypt digest."""
    parts = split_token(token)
    if parts is None:
        raise ValueError("malformed token: expected kvs_<id>_<secret of 16+ characters>")
    tid, secret = parts
    salt = secrets.token_bytes(16)
    return json.dumps(
        {
            "id": tid,
            "role": int(role),
            "tenant": tenant_id,
            "desc": description,
            "at": now,
            "salt": salt.hex(),
            "digest": _digest(secret, salt).hex(),
        }
    ).encode()


class TokenStore:
    """Tokens by id, with an in-memory cache of verified token strings."""

    def __init__(self) -> None:
        self.tokens: dict[str, StoredToken] = {}
        self._cache: dict[bytes, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"tokens": self.tokens}  # the verification cache never leaves memory

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tokens = state["tokens"]
        self._cache = {}

    # -- journaled changes -----------------------------------------------------------

    def apply_create(self, payload: bytes) -> StoredToken:
        d = json.loads(payload)
        t = StoredToken(
            d["id"],
            Role(d["role"]),
            d["tenant"],
            d["desc"],
            float(d["at"]),
            bytes.fromhex(d["salt"]),
            bytes.fromhex(d["digest"]),
        )
        self.tokens[t.token_id] = t
        return t

    def apply_revoke(self, token_id: str) -> bool:
        self._cache = {k: v for k, v in self._cache.items() if v != token_id}
        return self.tokens.pop(token_id, None) is not None

    def apply_bind(self, token_id: str, worker_id: str) -> None:
        t = self.tokens.get(token_id)
        if t is not None:
            t.worker_ids.add(worker_id)

    # -- queries -------------------------------------------------------------------------

    def has_admin(self) -> bool:
        """True when some fleet-wide admin token exists."""
        return any(t.role is Role.ADMIN for t in self.tokens.values())

    def bound_to(self, worker_id: str) -> str | None:
        """Id of the token a worker_id is registered to, if any."""
        for t in self.tokens.values():
            if worker_id in t.worker_ids:
                return t.token_id
        return None

    def authenticate(self, token: str) -> Principal | None:
        """The principal for a bearer token, or None when unknown, revoked or wrong."""
        key = hashlib.sha256(token.encode()).digest()
        tid = self._cache.get(key)
        if tid is None:
            parts = split_token(token)
            if parts is None or (t := self.tokens.get(parts[0])) is None:
                return None  # no scrypt for unknown ids: cheap to refuse floods
            if not hmac.compare_digest(_digest(parts[1], t.salt), t.digest):
                return None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = tid = t.token_id
        stored = self.tokens.get(tid)
        if stored is None:
            return None
        return Principal(stored.token_id, stored.role, stored.tenant_id)


def bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The bearer token in the call's metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, tok = value.partition(" ")
            if scheme.lower() == "bearer" and tok:
                return tok.strip()
    return None


class Authorizer:
    """Authenticates each call and checks its role; servicers check tenants."""

    def __init__(self, store: Callable[[], TokenStore], enabled: bool) -> None:
        self._store = store
        self.enabled = enabled

    async def require(
        self, context: grpc.aio.ServicerContext, roles: frozenset[Role], what: str
    ) -> Principal:
        """The caller's principal; aborts UNAUTHENTICATED / PERMISSION_DENIED otherwise."""
        if not self.enabled:
            return UNAUTHENTICATED_ADMIN
        tok = bearer(context)
        if tok is None:
            await errors.abort(
                context,
                errors.unauthenticated(
                    "missing bearer token: send metadata 'authorization: Bearer <token>'"
                ),
            )
        p = self._store().authenticate(tok)
        if p is None:
            await errors.abort(context, errors.unauthenticated("invalid or revoked token"))
        if p.role is not Role.ADMIN and p.role not in roles:
            await errors.abort(
                context,
                errors.permission_denied(
                    f"role {p.role.name.lower().replace('_', '-')} may not call {what}"
                ),
            )
        return p

    @staticmethod
    async def same_tenant(
        context: grpc.aio.ServicerContext, p: Principal, tenant_id: str, field: str
    ) -> None:
        """Abort PERMISSION_DENIED when ``p`` is confined to another tenant."""
        if p.confined_to_other(tenant_id):
            await errors.abort(
                context,
                errors.permission_denied(f"{field}: {p.confinement()}"),
            )


WORKERS = frozenset({Role.WORKER})
ROUTERS = frozenset({Role.ROUTER})
TENANT_ADMINS = frozenset({Role.TENANT_ADMIN})
ADMINS_ONLY = frozenset({Role.ADMIN})
