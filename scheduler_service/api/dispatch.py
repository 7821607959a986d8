"""The dispatcher: the one path from a validated wire input to the engine and journal.

Every input that changes the engine becomes a journal ``Record`` holding its wire
bytes and the ``now`` the engine saw. ``_apply`` turns a record into engine calls;
the live path and crash recovery both go through it, so a replay rebuilds the
exact state (the engine never reads a clock). Live inputs are validated and
applied synchronously, then appended; callers ack (and send directives) only
once the append is durable.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from google.protobuf.message import Message

from kvsched_client._proto.kvsched.v1 import admin_pb2, placement_pb2, worker_pb2
from scheduler_service.api import convert
from scheduler_service.api.auth import Role, StoredToken, TokenStore, create_record, new_token
from scheduler_service.domain import (
    NO_DECISIONS,
    Decisions,
    Rejected,
    TenantId,
    WorkerId,
    WorkerSpec,
)
from scheduler_service.engine import Engine
from scheduler_service.journal import Journal, LoadReport, Record, RecordKind, Snapshot
from scheduler_service.telemetry import Metrics

log = structlog.get_logger(__name__)

#: Bumped whenever the pickled state's shape changes incompatibly.
SNAPSHOT_FORMAT = "kvsched-state-5"

#: ReportSessionEvents remembers this many event ids for idempotency.
EVENT_ID_MEMORY = 1 << 20


@dataclass(slots=True)
class StreamHandle:
    """A connected worker stream: where its downstream messages go."""

    worker_id: WorkerId
    epoch: int
    send: Callable[[worker_pb2.ServerMessage], None]
    close: Callable[[str], None]
    last_seq_in_stream: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Applied:
    """Result of a live input: decisions to route once ``durable`` resolves."""

    decisions: Decisions
    durable: asyncio.Future[None]
    duplicate: bool = False


class Dispatcher:
    """Owns the engine, the journal and the routing of directives to streams."""

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        metrics: Metrics,
        max_pending_appends: int = 50_000,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.metrics = metrics
        self.tokens = TokenStore()
        self.draining = False
        self.standby = False  # a standby replica follows the leader's journal, serves nothing
        self._streams: dict[WorkerId, StreamHandle] = {}
        self._last_seq: dict[tuple[str, int], int] = {}
        # NOTE: not journaled: after a restart a worker resends a refused
        # message once more and is refused again, which is all it costs.
        self._refused: dict[tuple[str, int], tuple[int, str]] = {}
        self._event_ids: OrderedDict[str, None] = OrderedDict()
        self.undeliverable_directives = 0
        self.appends_since_snapshot = 0
        self.pending_appends = 0
        self.max_pending_appends = max_pending_appends

    # -- recovery -------------------------------------------------------------------

    def replay(self) -> LoadReport:
        """Rebuild state from the latest snapshot plus the journal after it."""
        snap, records = self.journal.load()
        if snap is not None:
            self._restore(snap.blob)
        n = 0
        for rec in records:
            try:
                self._apply(rec)
            except Exception as exc:  # a record that once applied must apply again
                log.error("journal.replay_failed", kind=rec.kind, error=repr(exc))
            n += 1
        report = self.journal.load_report()
        log.info("journal.replayed", records=n, dropped=report.dropped)
        return report

    @property
    def unavailable_reason(self) -> str | None:
        """Why new work is refused right now, or None when serving."""
        if self.draining:
            return "scheduler is draining"
        if self.standby:
            return "standby replica: not the leader"
        return None

    def apply_record(self, rec: Record) -> None:
        """Apply a record another replica journaled (standby catch-up)."""
        self._apply(rec)

    def restore_snapshot(self, blob: bytes) -> None:
        """Replace the whole state with a snapshot's (standby behind a trimmed journal)."""
        self._restore(blob)

    def become_leader(self, epoch: int, now: float) -> asyncio.Future[None]:
        """Journal and apply a new fencing epoch; directives from now on carry it."""
        rec = Record(RecordKind.LEADER, now, str(epoch).encode())
        self._apply(rec)
        return self._append(rec)

    # -- tokens -------------------------------------------------------------------------

    def create_token(
        self, role: Role, tenant_id: str, description: str, now: float, token: str | None = None
    ) -> tuple[StoredToken, str, asyncio.Future[None]]:
        """Issue a token (random unless given); returns (stored, secret string, durable)."""
        token = token or new_token()
        rec = Record(
            RecordKind.TOKEN_CREATE, now, create_record(token, role, tenant_id, description, now)
        )
        stored = self.tokens.apply_create(rec.payload)
        return stored, token, self._append(rec)

    def revoke_token(self, token_id: str, now: float) -> tuple[bool, asyncio.Future[None]]:
        """Revoke a token; (existed, durable)."""
        rec = Record(RecordKind.TOKEN_REVOKE, now, token_id.encode())
        return self.tokens.apply_revoke(token_id), self._append(rec)

    def bind_worker(self, token_id: str, worker_id: str, now: float) -> asyncio.Future[None]:
        """Register ``worker_id`` to a worker token."""
        rec = Record(
            RecordKind.TOKEN_BIND,
            now,
            json.dumps({"token": token_id, "worker": worker_id}).encode(),
        )
        self.tokens.apply_bind(token_id, worker_id)
        return self._append(rec)

    def snapshot(self, now: float) -> asyncio.Future[None]:
        """Queue a snapshot of the full state; the journal drops what it covers."""
        self.appends_since_snapshot = 0
        return self.journal.snapshot(Snapshot(now, self._dump()))

    def _dump(self) -> bytes:
        # NOTE: pickle of our own objects into our own data dir: the engine's
        # numpy arrays and dicts round-trip exactly, which replay relies on.
        state = {
            "format": SNAPSHOT_FORMAT,
            "engine": self.engine,
            "last_seq": self._last_seq,
            "event_ids": self._event_ids,
            "tokens": self.tokens,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def _restore(self, blob: bytes) -> None:
        state = pickle.loads(blob)
        if state.get("format") != SNAPSHOT_FORMAT:
            raise RuntimeError(
                f"snapshot format {state.get('format')!r} is not {SNAPSHOT_FORMAT!r}:"
                " written by an incompatible kvsched version"
            )
        self.engine = state["engine"]
        self._last_seq = state["last_seq"]
        self._event_ids = state["event_ids"]
        self.tokens = state["tokens"]

    def _append(self, rec: Record) -> asyncio.Future[None]:
        self.appends_since_snapshot += 1
        self.pending_appends += 1
        fut = self.journal.append(rec)
        fut.add_done_callback(self._appended)
        return fut

    def _appended(self, _: asyncio.Future[None]) -> None:
        self.pending_appends -= 1

    def overloaded(self) -> bool:
        """True while the journal is further behind than ``max_pending_appends``."""
        return self.pending_appends > self.max_pending_appends

    # -- worker stream ----------------------------------------------------------------

    def last_acked_seq(self, worker_id: str, epoch: int) -> int:
        """Highest seq of (worker, epoch) the journal holds."""
        return self._last_seq.get((worker_id, epoch), 0)

    def refused(self, worker_id: str, epoch: int, seq: int, field: str) -> None:
        """A stream of (worker, epoch) was closed for refusing message ``seq`` (``field``)."""
        self._refused[(worker_id, epoch)] = (seq, field)

    def refused_seq(self, worker_id: str, epoch: int) -> tuple[int, str]:
        """The refused (seq, field) a reconnecting (worker, epoch) should not resend as is.

        (0, "") when none, or once anything after it is applied: the worker
        has moved past it.
        """
        key = (worker_id, epoch)
        seq, field = self._refused.get(key, (0, ""))
        if seq and seq > self._last_seq.get(key, 0):
            return seq, field
        self._refused.pop(key, None)
        return 0, ""

    def hello(self, pb: worker_pb2.Hello, now: float) -> tuple[WorkerSpec, Applied]:
        """Register a worker; raises Rejected or StaleEpoch (nothing changes then)."""
        spec = convert.hello_from_pb(pb)
        rec = Record(RecordKind.HELLO, now, pb.SerializeToString(), spec.worker_id, spec.epoch)
        decisions = self._apply_hello(spec, now)
        return spec, Applied(decisions, self._append(rec))

    def attach(self, handle: StreamHandle) -> None:
        """Route a worker's directives to this stream (replacing an older stream)."""
        old = self._streams.get(handle.worker_id)
        if old is not None and old is not handle:
            old.close("replaced by a newer stream from the same worker")
        self._streams[handle.worker_id] = handle
        self.metrics.streams_open.add(1)

    def detach(self, handle: StreamHandle, now: float) -> asyncio.Future[None] | None:
        """A stream closed; the worker's KV may still be there."""
        self.metrics.streams_open.add(-1)
        if self._streams.get(handle.worker_id) is not handle:
            return None
        del self._streams[handle.worker_id]
        rec = Record(RecordKind.DISCONNECT, now, b"", handle.worker_id, handle.epoch)
        self._apply(rec)
        return self._append(rec)

    def worker_message(
        self, handle: StreamHandle, msg: worker_pb2.WorkerMessage, now: float
    ) -> Applied:
        """Apply one upstream message (not Hello); raises Rejected, changing nothing."""
        seq = msg.seq
        if seq <= handle.last_seq_in_stream:
            raise Rejected(
                "seq", f"must increase within a stream: {seq} after {handle.last_seq_in_stream}"
            )
        if msg.WhichOneof("body") is None:
            raise Rejected("body", "a message body is required")
        if msg.WhichOneof("body") == "hello":
            raise Rejected("hello", "Hello may only be the first message of a stream")
        handle.last_seq_in_stream = seq
        key = (handle.worker_id, handle.epoch)
        if seq <= self._last_seq.get(key, 0):
            # A resend after reconnect: already durable, ack it again, apply nothing.
            self.metrics.duplicates.add(1)
            return Applied(NO_DECISIONS, self.journal.barrier(), duplicate=True)
        rec = Record(
            RecordKind.WORKER_MESSAGE,
            now,
            msg.SerializeToString(),
            handle.worker_id,
            handle.epoch,
            seq,
        )
        decisions = self._apply_worker_message(rec, msg)
        return Applied(decisions, self._append(rec))

    # -- unary inputs -----------------------------------------------------------------

    def report_events(
        self, req: placement_pb2.ReportSessionEventsRequest, now: float
    ) -> tuple[int, int, Applied]:
        """Apply events idempotently; returns (accepted, duplicates, applied)."""
        rec = Record(RecordKind.REPORT_EVENTS, now, req.SerializeToString(), req.worker_id)
        accepted, dups, decisions = self._apply_report(req, now)
        return accepted, dups, Applied(decisions, self._append(rec))

    def tick(self, now: float) -> Applied:
        """Run the engine's periodic work (lease expiry)."""
        rec = Record(RecordKind.TICK, now)
        decisions = self._apply(rec)
        return Applied(decisions, self._append(rec))

    def admin(
        self, kind: RecordKind, pb: object, now: float
    ) -> tuple[object, asyncio.Future[None]]:
        """Apply an admin mutation; returns (result, durable)."""
        payload = pb.SerializeToString()  # type: ignore[attr-defined]
        rec = Record(kind, now, payload)
        result = self._apply_admin(kind, pb, now)
        return result, self._append(rec)

    # -- routing --------------------------------------------------------------------------

    def route(self, decisions: Decisions) -> None:
        """Send directives down the stream of the worker that holds each session."""
        for d in decisions.directives:
            handle = self._streams.get(d.worker_id)
            if handle is None:
                self.undeliverable_directives += 1
                continue
            handle.send(convert.directive_to_pb(d))
            self.metrics.directives.add(1, {"action": d.action.name})
        for wid in decisions.resync_workers:
            handle = self._streams.get(wid)
            if handle is not None:
                handle.send(
                    worker_pb2.ServerMessage(resync=worker_pb2.ResyncRequest(reason="reconcile"))
                )

    def broadcast_drain(self, reason: str, deadline_s: float) -> None:
        """Tell every connected worker the scheduler is going away."""
        msg = worker_pb2.ServerMessage(drain=worker_pb2.Drain(reason=reason, deadline_s=deadline_s))
        for handle in list(self._streams.values()):
            handle.send(msg)

    def stream_for(self, worker_id: WorkerId) -> StreamHandle | None:
        """The open stream of a worker, if any."""
        return self._streams.get(worker_id)

    # -- the one apply path (live and replay) ------------------------------------------

    def _apply(self, rec: Record) -> Decisions:
        if rec.kind is RecordKind.HELLO:
            pb = worker_pb2.Hello.FromString(rec.payload)
            return self._apply_hello(convert.hello_from_pb(pb), rec.now)
        if rec.kind is RecordKind.WORKER_MESSAGE:
            msg = worker_pb2.WorkerMessage.FromString(rec.payload)
            return self._apply_worker_message(rec, msg)
        if rec.kind is RecordKind.DISCONNECT:
            self.engine.worker_disconnected(WorkerId(rec.worker_id), rec.now)
            return NO_DECISIONS
        if rec.kind is RecordKind.REPORT_EVENTS:
            req = placement_pb2.ReportSessionEventsRequest.FromString(rec.payload)
            return self._apply_report(req, rec.now)[2]
        if rec.kind is RecordKind.TICK:
            return self.engine.tick(rec.now)
        if rec.kind is RecordKind.TOKEN_CREATE:
            self.tokens.apply_create(rec.payload)
            return NO_DECISIONS
        if rec.kind is RecordKind.TOKEN_REVOKE:
            self.tokens.apply_revoke(rec.payload.decode())
            return NO_DECISIONS
        if rec.kind is RecordKind.TOKEN_BIND:
            d = json.loads(rec.payload)
            self.tokens.apply_bind(d["token"], d["worker"])
            return NO_DECISIONS
        if rec.kind is RecordKind.LEADER:
            self.engine.leader_epoch = int(rec.payload.decode())
            return NO_DECISIONS
        pb_type = _ADMIN_TYPES[rec.kind]
        self._apply_admin(rec.kind, pb_type.FromString(rec.payload), rec.now)
        return NO_DECISIONS

    def _apply_hello(self, spec: WorkerSpec, now: float) -> Decisions:
        return self.engine.register_worker(spec, now)

    def _apply_worker_message(self, rec: Record, msg: worker_pb2.WorkerMessage) -> Decisions:
        wid = WorkerId(rec.worker_id)
        now = rec.now
        body = msg.WhichOneof("body")
        decisions = NO_DECISIONS
        if body == "session_events":
            events = convert.session_events_from_pb(
                msg.session_events.events, "session_events.events", wid
            )
            try:
                decisions = self.engine.handle_batch(events, now)
            except Rejected as r:
                raise Rejected(f"session_events.{r.field}", r.description) from None
            self.metrics.count_events(events)
        elif body == "kv_events":
            kv = convert.kv_events_from_pb(msg.kv_events, "kv_events")
            decisions = self.engine.kv_events(wid, kv, now)
        elif body == "pool_snapshot":
            inv = convert.pool_snapshot_from_pb(msg.pool_snapshot, "pool_snapshot")
            decisions = self.engine.reconcile(wid, inv, now)
        elif body == "directive_ack":
            did, outcome, reason = convert.directive_ack_from_pb(msg.directive_ack, "directive_ack")
            self.engine.directive_acked(wid, did, outcome, reason, now)  # type: ignore[arg-type]
        elif body == "heartbeat":
            load = convert.heartbeat_from_pb(msg.heartbeat, "heartbeat")
            decisions = self.engine.heartbeat(wid, load, now)
        elif body == "batch":
            decisions = self._apply_batch(wid, msg.batch, now)
        self._last_seq[(rec.worker_id, rec.epoch)] = rec.seq
        return decisions

    def _apply_batch(self, wid: WorkerId, b: worker_pb2.WorkerBatch, now: float) -> Decisions:
        """A WorkerBatch: every part validated first, then acks, KV events, session events."""
        if len(b.directive_acks) > convert.MAX_BATCH_EVENTS:
            raise Rejected(
                "batch.directive_acks", f"must hold at most {convert.MAX_BATCH_EVENTS} acks"
            )
        acks = [
            convert.directive_ack_from_pb(a, f"batch.directive_acks[{i}]")
            for i, a in enumerate(b.directive_acks)
        ]
        kv = (
            convert.kv_events_from_pb(b.kv_events, "batch.kv_events")
            if b.HasField("kv_events")
            else []
        )
        events = (
            convert.session_events_from_pb(b.session_events, "batch.session_events", wid)
            if b.session_events
            else []
        )
        if not (acks or kv or events):
            raise Rejected("batch", "must hold at least one ack, KV event or session event")
        if events:
            try:
                self.engine.check_events(events)
            except Rejected as r:
                # the engine names fields from its own batch: "events[i].…"
                field = r.field.removeprefix("events")
                raise Rejected(f"batch.session_events{field}", r.description) from None
        e = self.engine
        for did, outcome, reason in acks:
            e.directive_acked(wid, did, outcome, reason, now)  # type: ignore[arg-type]
        parts = []
        if kv:
            parts.append(e.kv_events(wid, kv, now))
        if events:
            # acks and KV events neither add nor end sessions: the check still holds
            parts.append(e.handle_batch(events, now, checked=True))
            self.metrics.count_events(events)
        if len(parts) == 1:
            return parts[0]
        return Decisions(
            tuple(d for p in parts for d in p.directives),
            tuple(w for p in parts for w in p.resync_workers),
        )

    def _apply_report(
        self, req: placement_pb2.ReportSessionEventsRequest, now: float
    ) -> tuple[int, int, Decisions]:
        wid = WorkerId(convert._id(req.worker_id, "worker_id"))
        if self.engine.worker_epoch(wid) is None:
            raise Rejected("worker_id", f"unknown worker {wid!r}: connect or register it first")
        events = convert.session_events_from_pb(req.events, "events", wid)
        fresh = []
        seen_in_batch: set[str] = set()
        for ev in events:
            if ev.event_id in self._event_ids or ev.event_id in seen_in_batch:
                continue
            seen_in_batch.add(ev.event_id)
            fresh.append(ev)
        decisions = self.engine.handle_batch(fresh, now) if fresh else NO_DECISIONS
        for eid in seen_in_batch:
            self._event_ids[eid] = None
        while len(self._event_ids) > EVENT_ID_MEMORY:
            self._event_ids.popitem(last=False)
        self.metrics.count_events(fresh)
        return len(fresh), len(events) - len(fresh), decisions

    def _apply_admin(self, kind: RecordKind, pb: object, now: float) -> object:
        e = self.engine
        if kind is RecordKind.TENANT_CREATE:
            assert isinstance(pb, admin_pb2.Tenant)
            return e.create_tenant(convert.tenant_from_pb(pb))
        if kind is RecordKind.TENANT_UPDATE:
            assert isinstance(pb, admin_pb2.UpdateTenantRequest)
            spec = convert.tenant_from_pb(pb.tenant)
            paths = list(pb.update_mask.paths)
            for i, p in enumerate(paths):
                if p not in convert.TENANT_MUTABLE_FIELDS:
                    raise Rejected(
                        f"update_mask.paths[{i}]", f"{p!r} is not a mutable tenant field"
                    )
            return e.update_tenant(spec, paths or None)
        if kind is RecordKind.TENANT_DELETE:
            assert isinstance(pb, admin_pb2.DeleteTenantRequest)
            return e.delete_tenant(convert.tenant_id_from_pb(pb.tenant_id))
        if kind is RecordKind.DRAIN_WORKER:
            assert isinstance(pb, admin_pb2.DrainWorkerRequest)
            return e.drain_worker(WorkerId(pb.worker_id), now)
        raise ValueError(f"not an admin record: {kind}")

    def tenant_known(self, tenant_id: TenantId) -> bool:
        """True when the tenant exists."""
        return self.engine.get_tenant(tenant_id) is not None


_ADMIN_TYPES: dict[RecordKind, type[Message]] = {
    RecordKind.TENANT_CREATE: admin_pb2.Tenant,
    RecordKind.TENANT_UPDATE: admin_pb2.UpdateTenantRequest,
    RecordKind.TENANT_DELETE: admin_pb2.DeleteTenantRequest,
    RecordKind.DRAIN_WORKER: admin_pb2.DrainWorkerRequest,
}
