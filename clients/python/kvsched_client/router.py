"""PlacementClient: Place with a deadline, failing open to rendezvous-hash affinity.

The router must never wait on the scheduler: each call carries a deadline
(10 ms by default), and on a timeout, an error or an empty answer the client
picks workers itself by rendezvous (highest-random-weight) hashing of the
session id over the live workers. The same session lands on the same worker
for as long as the worker set is stable, and only 1/N of sessions move when a
worker joins or leaves, so affinity (and the KV it keeps) survives an outage.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc

from kvsched_client._proto.kvsched.v1 import placement_pb2, placement_pb2_grpc

__all__ = ["PlaceResult", "PlacementClient", "SyncPlacementClient", "rendezvous_order"]

DEFAULT_DEADLINE_S = 0.010
#: After a failure, calls skip the service for this long so an outage costs the
#: router one deadline, not one per request.
DEFAULT_COOLDOWN_S = 1.0


@dataclass(frozen=True, slots=True)
class PlaceResult:
    """Where to run a step: ordered worker ids (primary first) and how it was chosen."""

    worker_ids: tuple[str, ...]
    endpoints: tuple[str, ...]
    fell_back: bool
    # "affinity", "least_loaded", ... from the service, or "fallback:<why>".
    reason: str
    step_priority: int = 0
    affinity_ttl_s: float = 0.0

    @property
    def primary(self) -> str | None:
        """Returns the primary worker id (None when no worker is live)."""
        return self.worker_ids[0] if self.worker_ids else None


def rendezvous_order(session_id: str, worker_ids: Iterable[str]) -> list[str]:
    """Returns the workers ordered by rendezvous weight for this session (best first)."""

    def weight(worker_id: str) -> tuple[bytes, str]:
        key = f"{session_id}\x00{worker_id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest(), worker_id

    return sorted(set(worker_ids), key=weight, reverse=True)


class _Fallback:
    """Live-worker registry and the fail-open decision, shared by both clients."""

    def __init__(
        self,
        live_workers: Mapping[str, str] | None,
        cooldown_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.live: dict[str, str] = dict(live_workers or {})  # worker id -> endpoint
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.skip_until_s = 0.0
        self.fallbacks = 0

    def should_skip(self) -> bool:
        return self.clock() < self.skip_until_s

    def result(self, request: placement_pb2.PlaceRequest, why: str) -> PlaceResult:
        self.fallbacks += 1
        pool: Iterable[str] = self.live.keys()
        if request.candidate_worker_ids:
            pool = [w for w in request.candidate_worker_ids if w in self.live]
        k = request.max_candidates or 3
        ids = tuple(rendezvous_order(request.session_id, pool)[:k])
        return PlaceResult(ids, tuple(self.live[w] for w in ids), True, f"fallback:{why}")

    def failed(self, why: str, request: placement_pb2.PlaceRequest) -> PlaceResult:
        self.skip_until_s = self.clock() + self.cooldown_s
        return self.result(request, why)

    def answer(
        self, request: placement_pb2.PlaceRequest, resp: placement_pb2.PlaceResponse
    ) -> PlaceResult:
        if not resp.candidates:
            return self.result(request, "empty")
        for c in resp.candidates:
            if c.endpoint:
                self.live.setdefault(c.worker_id, c.endpoint)
        return PlaceResult(
            tuple(c.worker_id for c in resp.candidates),
            tuple(c.endpoint for c in resp.candidates),
            False,
            resp.reason,
            resp.step_priority,
            resp.affinity_ttl_s,
        )


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a router-role bearer token (`--auth token` servers)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _why(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline"
    return code.name.lower() if code is not None else "error"


class _PlacementClientBase:
    """What the async and blocking clients share: stub, deadline, fallback, token."""

    def __init__(
        self,
        channel: grpc.Channel | grpc.aio.Channel,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        live_workers: Mapping[str, str] | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        self._stub = placement_pb2_grpc.PlacementServiceStub(channel)
        self.deadline_s = deadline_s
        self._fb = _Fallback(live_workers, cooldown_s, clock)
        self._metadata = _auth(token)

    def set_live_workers(self, live_workers: Mapping[str, str]) -> None:
        """Replaces the worker set the fallback chooses from (id -> endpoint)."""
        self._fb.live = dict(live_workers)

    @property
    def fallbacks(self) -> int:
        """Returns how many calls were answered by the fallback."""
        return self._fb.fallbacks


class PlacementClient(_PlacementClientBase):
    """Async Place with a deadline and a rendezvous-hash fallback."""

    async def place(self, request: placement_pb2.PlaceRequest) -> PlaceResult:
        """Returns the service's placement, or the fallback's within the deadline."""
        if self._fb.should_skip():
            return self._fb.result(request, "cooldown")
        try:
            resp = await self._stub.Place(request, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as err:
            return self._fb.failed(_why(err), request)
        return self._fb.answer(request, resp)


class SyncPlacementClient(_PlacementClientBase):
    """Blocking twin of PlacementClient for routers that are not asyncio."""

    def place(self, request: placement_pb2.PlaceRequest) -> PlaceResult:
        """Returns the service's placement, or the fallback's within the deadline."""
        if self._fb.should_skip():
            return self._fb.result(request, "cooldown")
        try:
            resp = self._stub.Place(request, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as err:
            return self._fb.failed(_why(err), request)
        return self._fb.answer(request, resp)
