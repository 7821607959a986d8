"""The live fleet: workers (WorkerClient + a reference BlockPool each) and routers
(PlacementClient) driving a running kvsched over real gRPC on an open-loop schedule.

Open loop: event ``i`` of the run is due at ``t0 + i / rate`` whatever the server
does, and its ack latency counts from that due time, so a server stall shows as
latency instead of slowing the generator down (no coordinated omission). Each due
event goes to a live session picked at random; a session reports its plan in
order (STEP_START, STEP_END, TOOL_CALL_WAIT, TOOL_CALL_END, ..., SESSION_FINISH)
and a finished session is replaced by a new one, so ``sessions`` stay live.
Tool waits are therefore compressed to the gaps between a session's events.

Before a STEP_START a router calls Place (deadline, fallback) while the
``place_rps`` budget allows; the session's later events wait for the answer,
so STEP_START ack latency includes the Place round trip, as it would in a router.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from kvsched_client._proto.kvsched.v1 import placement_pb2, types_pb2, worker_pb2
from kvsched_client.pool import BlockPool, PoolExhaustedError
from kvsched_client.router import PlacementClient, PlaceResult
from kvsched_client.worker import WorkerClient
from loadtest.fleet_metrics import Recorder
from loadtest.fleet_sessions import SESSION_FINISH, STEP_END, STEP_START, SessionPlan, new_session

__all__ = ["Fleet", "FleetConfig"]

_EVENTS_PER_TURN = 128


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """One run's shape."""

    target: str
    workers: int = 64
    sessions: int = 5000
    rate_per_s: float = 20_000.0
    duration_s: float = 60.0
    scenario: str = "coding"
    tenants: int = 4
    routers: int = 4
    place_rps: float = 2_000.0
    place_deadline_s: float = 0.010
    place_cooldown_s: float = 0.1
    # NOTE: a generator that falls behind would otherwise pile up Place calls
    # without bound; past this many in flight a step keeps its worker (place_skipped).
    max_place_in_flight: int = 256
    # Only Place calls, `rate_per_s` of them per second (workers stream nothing but Hello).
    place_only: bool = False
    pools: bool = True
    # Pool blocks per worker; each pool token stands for `token_scale` real tokens
    # so the reference pool (pure Python) keeps up with tens of thousands of events/s.
    pool_blocks: int = 2_000
    token_scale: int = 256
    batch_events: int = 256
    batch_delay_s: float = 0.002
    # One WorkerBatch for everything pending (False: one message per kind)
    combine_messages: bool = True
    # Routers place over one PlaceStream each instead of one unary call per step
    place_stream: bool = False
    drain_s: float = 10.0
    seed: int = 0
    token: str | None = None


@dataclass(slots=True)
class _Live:
    plan: SessionPlan
    worker: int
    token_base: int
    pool_tokens: int = 0
    placing: bool = False
    backlog: list[float] = field(default_factory=list)


class _StreamErrors(logging.Handler):
    """Counts worker stream closures by status code from the client's log."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(logging.INFO)
        self.rec = rec

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("kvsched stream closed") and record.args:
            self.rec.errors[f"stream:{record.args[0]}"] += 1  # type: ignore[index]
        elif record.msg.startswith("kvsched stream error"):
            self.rec.errors["stream:client_error"] += 1


class Fleet:
    """A fleet of workers and routers (see module doc)."""

    def __init__(self, cfg: FleetConfig, rec: Recorder | None = None) -> None:
        self.cfg = cfg
        self.rec = rec or Recorder()
        self.run_id = uuid.uuid4().hex[:8]
        self._rng = np.random.default_rng(cfg.seed)
        self._intended: dict[str, float] = {}
        self._live: list[_Live | None] = [None] * cfg.sessions
        self._next_session = 0
        self._next_event = 0
        self._eid = 0
        self._t0 = 0.0
        self._place_tokens = 0.0
        self._place_tasks: set[asyncio.Task[None]] = set()
        self.workers: list[WorkerClient] = []
        self.pools: list[BlockPool | None] = []
        self._worker_index: dict[str, int] = {}
        self.routers: list[PlacementClient] = []
        self._channels: list[grpc.aio.Channel] = []
        self.finished = False
        self._log_handler: logging.Handler | None = None

    # ------------------------------------------------------------- set-up

    async def start(self, connect_timeout_s: float = 10.0) -> None:
        """Opens every worker stream and router channel; raises if a stream fails."""
        cfg = self.cfg
        epoch = int(time.time() * 1000)
        live: dict[str, str] = {}
        for i in range(cfg.workers):
            wid = f"lt-{self.run_id}-w{i}"
            endpoint = f"127.0.0.1:{20000 + i}"  # never dialled: routers only name it
            pool = BlockPool(
                gpu_capacity_blocks=cfg.pool_blocks, host_capacity_blocks=cfg.pool_blocks
            )
            hello = worker_pb2.Hello(
                worker_id=wid, epoch=epoch, endpoint=endpoint, engine_name="loadtest", model="m"
            )
            client = WorkerClient(
                cfg.target,
                hello,
                pool,
                max_batch_events=cfg.batch_events,
                max_batch_delay_s=cfg.batch_delay_s,
                collect_pool_events=cfg.pools,
                token=cfg.token,
                on_acked=self._on_acked,
                combine_messages=cfg.combine_messages,
            )
            self.workers.append(client)
            self.pools.append(pool if cfg.pools else None)
            self._worker_index[wid] = i
            live[wid] = endpoint
        self._log_handler = _StreamErrors(self.rec)
        logging.getLogger("kvsched_client.worker").addHandler(self._log_handler)
        logging.getLogger("kvsched_client.worker").setLevel(logging.INFO)
        for w in self.workers:
            await w.start()
        for w in self.workers:
            if not await w.wait_connected(connect_timeout_s):
                raise RuntimeError(f"worker stream to {cfg.target} did not open")
        for _ in range(max(1, cfg.routers)):
            ch = grpc.aio.insecure_channel(cfg.target)
            self._channels.append(ch)
            self.routers.append(
                PlacementClient(
                    ch,
                    deadline_s=cfg.place_deadline_s,
                    live_workers=live,
                    cooldown_s=cfg.place_cooldown_s,
                    token=cfg.token,
                    stream=cfg.place_stream,
                )
            )

    # ------------------------------------------------------------ the run

    async def run(self) -> float:
        """Drives the schedule for `duration_s`, then drains; returns the elapsed seconds."""
        cfg = self.cfg
        # NOTE: an overloaded run holds millions of buffered events; the cyclic GC's
        # full passes over them then stall the loop for seconds and the run collapses.
        # Nothing here makes reference cycles worth collecting mid-run.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return await self._run(cfg)
        finally:
            if gc_was_enabled:
                gc.enable()

    async def _run(self, cfg: FleetConfig) -> float:
        self._t0 = time.perf_counter()
        last = self._t0
        end = self._t0 + cfg.duration_s
        total = int(cfg.duration_s * cfg.rate_per_s)
        picks = self._rng.integers(0, cfg.sessions, size=max(1, total))
        # NOTE: the first `sessions` events open every session once, so the server
        # tracks all of them early (a random pick would leave some unopened for long).
        fill = min(total, cfg.sessions)
        picks[:fill] = np.arange(fill)
        while self._next_event < total:
            now = time.perf_counter()
            if now >= end + cfg.drain_s:
                # The generator itself fell this far behind: bounded in time, counted.
                self.rec.errors["not_sent"] += total - self._next_event
                break
            self._place_tokens = min(
                cfg.place_rps, self._place_tokens + (now - last) * cfg.place_rps
            )
            last = now
            due = min(total, int((now - self._t0) * cfg.rate_per_s) + 1)
            # NOTE: a few ms of work per turn at most: asyncio gives every ready task
            # one turn per loop pass, so a long generator turn starves the streams'
            # reads and writes (acks then arrive seconds late) when the generator is behind.
            stop = min(due, self._next_event + _EVENTS_PER_TURN)
            for i in range(self._next_event, stop):
                self._emit(int(picks[i]), self._t0 + i / cfg.rate_per_s)
            self._next_event = stop
            await asyncio.sleep(0.001 if stop >= due else 0.0)
        gen_end = time.perf_counter()
        if self._place_tasks:
            await asyncio.gather(*self._place_tasks, return_exceptions=True)
        await self._drain(time.monotonic() + cfg.drain_s)
        self.finished = True
        self._collect()
        return gen_end - self._t0

    async def _drain(self, deadline: float) -> None:
        """Flush every worker until nothing more arrives (bounded by ``deadline``).

        # NOTE: one worker's last message can make the server send a directive
        # to another worker that has already flushed (a moved session's old
        # home, pressure elsewhere); its answer needs one more flush.
        """
        while True:
            left = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(w.flush(left) for w in self.workers))
            seen = self._directives_seen()
            await asyncio.sleep(0.05)
            settled = seen == self._directives_seen() and all(w.outbox.idle() for w in self.workers)
            if settled or time.monotonic() >= deadline:
                return

    def _directives_seen(self) -> int:
        return sum(
            w.stats.directives_applied
            + w.stats.directives_rejected
            + w.stats.directives_stale
            + w.stats.directives_repeated
            for w in self.workers
        )

    def _emit(self, slot: int, intended: float) -> None:
        cfg = self.cfg
        rec = self.rec
        rec.events_due += 1
        s = self._live[slot]
        if cfg.place_only:
            # Router load alone: each due tick is one Place call, no session events.
            if len(self._place_tasks) >= cfg.max_place_in_flight:
                rec.place_skipped += 1
                return
            plan = (s or self._new_session(slot)).plan
            task = asyncio.create_task(self._place_call(plan, intended))
            self._place_tasks.add(task)
            task.add_done_callback(self._place_tasks.discard)
            return
        # NOTE: events already waiting behind a Place count against the plan; a plan
        # with nothing left to give hands its slot to a new session (the old one
        # finishes in its Place task), so no due event is ever lost.
        if s is None or s.plan.events_total - s.plan.cursor - len(s.backlog) <= 0:
            s = self._new_session(slot)
        if s.placing:
            s.backlog.append(intended)
            return
        if (
            s.plan.peek_kind() == STEP_START
            and self._place_tokens >= 1.0
            and len(self._place_tasks) < cfg.max_place_in_flight
        ):
            self._place_tokens -= 1.0
            s.placing = True
            s.backlog.append(intended)
            task = asyncio.create_task(self._place(s, intended))
            self._place_tasks.add(task)
            task.add_done_callback(self._place_tasks.discard)
            return
        if s.plan.peek_kind() == STEP_START:
            rec.place_skipped += 1
        self._report(s, intended)

    def _new_session(self, slot: int) -> _Live:
        cfg = self.cfg
        n = self._next_session
        self._next_session += 1
        sid = f"lt-{self.run_id}-s{n}"
        plan = new_session(self._rng, cfg.scenario, sid, f"tenant-{n % max(1, cfg.tenants)}")
        s = _Live(plan, slot % cfg.workers, token_base=n * 1_000_000)
        self._live[slot] = s
        self.rec.sessions_started += 1
        return s

    async def _place(self, s: _Live, intended: float) -> None:
        try:
            res = await self._place_call(s.plan, intended)
        finally:
            s.placing = False
        self._placed(s, res)

    async def _place_call(self, plan: SessionPlan, intended: float) -> PlaceResult:
        """Calls Place for the plan's next step; records latency from `intended`."""
        step = min(plan.cursor // 4, plan.steps - 1)
        req = placement_pb2.PlaceRequest(
            session_id=plan.session_id,
            tenant_id=plan.tenant_id,
            agent_type=plan.agent_type,
            step_index=step,
            context_tokens=plan.context_tokens + int(plan.prompt_tokens[step]),
            new_tokens=int(plan.prompt_tokens[step]),
        )
        router = self.routers[hash(plan.session_id) % len(self.routers)]
        res = await router.place(req)
        now = time.perf_counter()
        rec = self.rec
        rec.place_calls += 1
        rec.place.record(now - intended, now - self._t0)
        if res.fell_back:
            rec.place_fallbacks += 1
            rec.errors[f"place:{res.reason.removeprefix('fallback:')}"] += 1
        return res

    def _placed(self, s: _Live, res: PlaceResult) -> None:
        plan = s.plan
        now = time.monotonic()
        target = self._worker_index.get(res.primary or "", s.worker)
        if target != s.worker:
            pool = self.pools[s.worker]
            if pool is not None:
                # The old replica keeps the blocks as prefix cache (LRU), not as a session.
                pool.finish_session(plan.session_id, now)
            s.worker = target
            s.pool_tokens = 0
        backlog, s.backlog = s.backlog, []
        for t in backlog:
            if s.placing:  # a later STEP_START in the backlog is placed again
                s.backlog.append(t)
            elif not plan.done:
                self._report(s, t)

    def _report(self, s: _Live, intended: float) -> None:
        plan = s.plan
        kind, step, ctx, new, tool = plan.take()
        self._eid += 1
        eid = f"{self.run_id}-{self._eid}"
        ev = types_pb2.SessionEvent(
            event_id=eid,
            session_id=plan.session_id,
            tenant_id=plan.tenant_id,
            agent_type=plan.agent_type,
            step_index=step,
            kind=kind,
            context_tokens=ctx,
            new_tokens=new,
            tool_name=tool,
            event_time_s=time.time(),
        )
        self._intended[eid] = intended
        self.workers[s.worker].report(ev)
        self.rec.events_sent += 1
        if kind == SESSION_FINISH:
            self.rec.sessions_finished += 1
        pool = self.pools[s.worker]
        if pool is not None:
            self._drive_pool(pool, s, kind, ctx)

    def _drive_pool(self, pool: BlockPool, s: _Live, kind: int, ctx: int) -> None:
        now = time.monotonic()  # WorkerClient's default clock: leases expire on it
        n = ctx // self.cfg.token_scale
        sid = s.plan.session_id
        try:
            if kind == STEP_START:
                pool.start_step(sid, s.plan.tenant_id, range(s.token_base, s.token_base + n), now)
                s.pool_tokens = n
            elif kind == STEP_END:
                gen = range(s.token_base + s.pool_tokens, s.token_base + max(n, s.pool_tokens))
                pool.end_step(sid, now, gen)
                s.pool_tokens = max(n, s.pool_tokens)
            elif kind == SESSION_FINISH:
                pool.finish_session(sid, now)
        except PoolExhaustedError:
            self.rec.pool_exhausted += 1
        except (KeyError, ValueError):
            # A step that could not be admitted has no running step to end.
            self.rec.errors["pool:step_state"] += 1

    def _on_acked(self, msg: worker_pb2.WorkerMessage) -> None:
        body = msg.WhichOneof("body")
        rec = self.rec
        if body == "batch":
            b = msg.batch
            self._events_acked(b.session_events)
            rec.directive_acks_acked += len(b.directive_acks)
            rec.kv_batches_acked += int(b.HasField("kv_events"))
        elif body == "session_events":
            self._events_acked(msg.session_events.events)
        elif body == "directive_ack":
            rec.directive_acks_acked += 1
        elif body == "kv_events":
            rec.kv_batches_acked += 1

    def _events_acked(self, events: Iterable[types_pb2.SessionEvent]) -> None:
        if not events:
            return
        rec = self.rec
        now = time.perf_counter()
        at_s = now - self._t0
        for ev in events:
            t = self._intended.pop(ev.event_id, None)
            if t is None:
                rec.errors["ack:unknown_event"] += 1
                continue
            rec.ack.record(now - t, at_s)
            rec.events_acked += 1

    def _collect(self) -> None:
        rec = self.rec
        rec.directives_received = self._directives_seen()
        rec.directives_applied = sum(w.stats.directives_applied for w in self.workers)
        rec.messages_framed = sum(w.outbox.stats.framed_messages for w in self.workers)
        rec.place_streams = sum(r.streams_opened for r in self.routers)
        dropped = sum(w.outbox.stats.dropped_session_events for w in self.workers)
        if dropped:
            rec.errors["dropped_by_outbox"] = dropped
        if self._intended:
            rec.errors["unacked"] = len(self._intended)

    def progress(self) -> dict[str, float]:
        """Returns live counters for the progress display."""
        rec = self.rec
        el = max(1e-9, time.perf_counter() - self._t0) if self._t0 else 1e-9
        return {
            "elapsed_s": el,
            "events_acked": rec.events_acked,
            "events_per_s": rec.events_acked / el,
            "in_flight": len(self._intended),
            "ack_p99_ms": rec.ack.pct_ms(99),
            "place_p99_ms": rec.place.pct_ms(99),
            "place_calls": rec.place_calls,
            "errors": sum(rec.errors.values()),
            "sessions": rec.sessions_started,
        }

    async def stop(self) -> None:
        """Closes every stream and channel."""
        await asyncio.gather(*(w.stop(flush_timeout_s=0.0) for w in self.workers))
        for r in self.routers:
            await r.close()
        for ch in self._channels:
            await ch.close()
        if self._log_handler is not None:
            logging.getLogger("kvsched_client.worker").removeHandler(self._log_handler)
