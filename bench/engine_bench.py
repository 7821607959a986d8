"""Engine benchmark: events/s and Place latency at fleet scale, numba vs reference.

Builds a cluster of ``--workers`` workers and ``--sessions`` live agent
sessions, replays a synthetic agent event mix in-process through
``Engine.handle_batch`` (ticks included), then times ``Engine.place`` one call
at a time into an HDR histogram. The same run continues, on the same engine
and state, with the compiled batch path switched off (every event through the
per-event Python path, on the numba kernels) and then on the plain-Python
reference kernels (fewer events), so the ratios are measured on one machine in
one process; and it runs at ``--small-sessions`` sessions to show how cost per
event changes as sessions grow.

    python bench/engine_bench.py            # table
    python bench/engine_bench.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from hdrh.histogram import HdrHistogram

from scheduler_service.domain import (
    CacheSpec,
    EventId,
    EventKind,
    PlaceRequest,
    SessionEvent,
    SessionId,
    TenantId,
    WorkerId,
    WorkerLoad,
    WorkerSpec,
)
from scheduler_service.engine import Engine, EngineConfig
from scheduler_service.kernels import NUMBA, REFERENCE

AGENTS = ("coder", "browser", "rag", "multi")
TOOLS = ("bash", "pytest", "edit", "search", "fetch")
TENANTS = tuple(TenantId(f"tenant{i}") for i in range(8))
BATCH = 64
SIM_EVENTS_PER_S = 20_000.0  # simulated-time rate: sets tool durations and tick spacing
TICK_EVERY_S = 0.05
BLOCKS_PER_SESSION = 330  # mean of the generated contexts (+ one step's output), in blocks


@dataclass
class Fleet:
    """The synthetic agent population and its per-session lifecycle cursor."""

    rng: np.random.Generator
    n_sessions: int
    n_workers: int
    next_id: int = 0

    def __post_init__(self) -> None:
        n = self.n_sessions
        self.ids = [SessionId("")] * n
        self.phase = np.zeros(n, dtype=np.int8)  # 0 running, 1 tool wait, 2 tool done
        self.ctx = np.zeros(n, dtype=np.int64)
        self.worker = np.zeros(n, dtype=np.int64)
        self.agent = np.zeros(n, dtype=np.int64)
        self.tenant = np.zeros(n, dtype=np.int64)
        self.step = np.zeros(n, dtype=np.int64)
        self.worker_ids = [WorkerId(f"w{i:04d}") for i in range(self.n_workers)]
        self._eid = 0

    def _event(self, i: int, kind: EventKind, **kw: object) -> SessionEvent:
        self._eid += 1
        return SessionEvent(
            event_id=EventId(f"e{self._eid}"),
            session_id=self.ids[i],
            tenant_id=TENANTS[self.tenant[i]],
            agent_type=AGENTS[self.agent[i]],
            step_index=int(self.step[i]),
            kind=kind,
            context_tokens=int(self.ctx[i]),
            worker_id=self.worker_ids[self.worker[i]],
            **kw,  # type: ignore[arg-type]
        )

    def start(self, i: int) -> SessionEvent:
        """A new session in slot ``i``: its first STEP_START."""
        self.next_id += 1
        self.ids[i] = SessionId(f"s{self.next_id}")
        self.phase[i] = 0
        self.ctx[i] = int(self.rng.lognormal(np.log(4_000), 0.6))
        self.worker[i] = self.rng.integers(self.n_workers)
        self.agent[i] = self.rng.integers(len(AGENTS))
        self.tenant[i] = self.rng.integers(len(TENANTS))
        self.step[i] = 0
        return self._event(i, EventKind.STEP_START, new_tokens=500)

    def populate(self) -> Iterator[SessionEvent]:
        """Start every session and leave it at a random point of its step loop.

        Generated lazily (nothing is kept). Starting mid-loop makes the timed
        mix steady-state from its first event instead of all tool waits.
        """
        for i in range(self.n_sessions):
            yield self.start(i)
            for _ in range(int(self.rng.integers(3))):
                yield self.next_event(i)

    def next_event(self, i: int) -> SessionEvent:
        """The next event in session ``i``'s life."""
        r = self.rng.random()
        ph = self.phase[i]
        if ph == 0:
            self.phase[i] = 1
            tool = TOOLS[int(r * 1_000) % len(TOOLS)]
            hint = float(1 + (int(r * 10_000) % 30)) if r < 0.3 else 0.0
            return self._event(
                i, EventKind.TOOL_CALL_WAIT, tool_name=tool, expected_tool_latency_s=hint
            )
        if ph == 1:
            self.phase[i] = 2
            self.ctx[i] += 200 + int(r * 2_000)
            return self._event(i, EventKind.TOOL_CALL_END)
        if r < 0.04:
            ev = self._event(i, EventKind.SESSION_FINISH)
            self.phase[i] = 3  # replaced by a new session on its next pick
            return ev
        self.phase[i] = 0
        self.step[i] += 1
        self.ctx[i] += 300
        return self._event(i, EventKind.STEP_START, new_tokens=500)

    def mix(self, n_events: int, batch: int) -> Iterator[list[SessionEvent]]:
        """``n_events`` events from uniformly random sessions, each in its lifecycle
        order, in batches of ``batch`` made as they are asked for."""
        picks = self.rng.integers(self.n_sessions, size=n_events).tolist()
        for at in range(0, n_events, batch):
            out = []
            for i in picks[at : at + batch]:
                out.append(self.start(i) if self.phase[i] == 3 else self.next_event(i))
            yield out


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def build(
    n_workers: int, n_sessions: int, fill: float, seed: int
) -> tuple[Engine, Fleet, float, int]:
    """An engine with the fleet registered and every session started (time 0 → t)."""
    engine = Engine(EngineConfig())
    # NOTE: capacity scales with sessions per worker so pools start ~``fill``
    # full at any scale: 10k and 100k sessions then run the same mix under the
    # same pressure, and per-event cost can be compared. At 100k sessions on
    # 1,024 workers that is ~38k blocks of 16 tokens (an H200 with an 8B model).
    per_worker = n_sessions / n_workers
    cap = max(1_000, math.ceil(per_worker * BLOCKS_PER_SESSION / fill))
    cache = CacheSpec(
        16, 131_072, cap, 2 * cap, prefill_tokens_per_s=25_000.0, host_link_bytes_per_s=40e9
    )
    fleet = Fleet(np.random.default_rng(seed), n_sessions, n_workers)
    for wid in fleet.worker_ids:
        engine.register_worker(WorkerSpec(wid, 1, cache, endpoint=f"{wid}:8000"), 0.0)
        engine.heartbeat(wid, WorkerLoad(gpu_free_blocks=cap, host_free_blocks=2 * cap), 0.0)
    gc.collect()
    base = rss_bytes()
    now = 0.0
    batch: list[SessionEvent] = []
    for ev in fleet.populate():
        batch.append(ev)
        if len(batch) == BATCH:
            engine.handle_batch(batch, now)
            batch.clear()
            now += BATCH / SIM_EVENTS_PER_S
    if batch:
        engine.handle_batch(batch, now)
    batch.clear()
    gc.collect()
    per_session = (rss_bytes() - base) // n_sessions
    return engine, fleet, now, per_session


def run_events(
    engine: Engine, batches: Iterator[list[SessionEvent]], now: float
) -> tuple[float, float]:
    """Replay ``batches`` with ticks; returns (events per CPU second, end time).

    # NOTE: CPU time of this process, not wall time: the figure is "events/s on
    # one core", and on a shared machine wall time mostly measures the neighbours.
    # The clock runs only while the engine does: each batch is made just before
    # it is handed over, with the clock stopped, as a server decodes a message
    # right before the engine takes its events. (Made all up front, 200k events
    # would leave the cache long before their turn, and the engine would pay
    # to bring each back.)
    """
    next_tick = now + TICK_EVERY_S
    clock = time.process_time
    gc.collect()
    n = 0
    elapsed = 0.0
    for batch in batches:
        t0 = clock()
        engine.handle_batch(batch, now)
        now += BATCH / SIM_EVENTS_PER_S
        if now >= next_tick:
            engine.tick(now)
            next_tick += TICK_EVERY_S
        elapsed += clock() - t0
        n += len(batch)
    return n / elapsed, now


def run_places(engine: Engine, fleet: Fleet, n: int, now: float) -> dict[str, float]:
    """Time ``n`` Place calls one by one; percentiles in microseconds."""
    hist = HdrHistogram(1, 10_000_000, 3)  # nanoseconds
    picks = fleet.rng.integers(fleet.n_sessions, size=n)
    reqs = [
        PlaceRequest(
            session_id=fleet.ids[int(i)],
            tenant_id=TENANTS[fleet.tenant[int(i)]],
            agent_type=AGENTS[fleet.agent[int(i)]],
            step_index=int(fleet.step[int(i)]) + 1,
            context_tokens=int(fleet.ctx[int(i)]),
            new_tokens=500,
        )
        for i in picks
    ]
    clock = time.perf_counter_ns
    gc.collect()
    for req in reqs:
        t0 = clock()
        engine.place(req, now)
        hist.record_value(max(1, clock() - t0))
    return {
        "place_p50_us": hist.get_value_at_percentile(50.0) / 1_000,
        "place_p99_us": hist.get_value_at_percentile(99.0) / 1_000,
        "place_p999_us": hist.get_value_at_percentile(99.9) / 1_000,
    }


def measure(
    n_workers: int,
    n_sessions: int,
    n_events: int,
    n_places: int,
    fill: float,
    seed: int,
    ref_events: int = 0,
    ref_places: int = 0,
    per_event_events: int = 0,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Build, replay, place on numba with the batch path; then the same engine on
    numba with every event through the per-event Python path; then on the
    reference twins (an empty dict for a run given no events)."""
    t_build = time.perf_counter()
    engine, fleet, now, per_session = build(n_workers, n_sessions, fill, seed)
    build_s = time.perf_counter() - t_build
    figures: list[dict[str, float]] = []
    runs = (
        (NUMBA, True, n_events, n_places),
        (NUMBA, False, per_event_events, n_places),
        (REFERENCE, False, ref_events, ref_places),
    )
    for kernels, batch_path, n_ev, n_pl in runs:
        if not n_ev:
            figures.append({})
            continue
        engine.use_kernels(kernels)
        engine.config.batch_path = batch_path
        d0 = engine.directives_total
        eps, now = run_events(engine, fleet.mix(n_ev, BATCH), now)
        places = run_places(engine, fleet, n_pl, now)
        stats = engine.stats(now)
        figures.append(
            {
                "events_per_s": eps,
                **places,
                "bytes_per_session": float(per_session),
                "workers": float(n_workers),
                "sessions": float(
                    stats.sessions_running + stats.sessions_tool_wait + stats.sessions_idle
                ),
                "directives_per_event": (engine.directives_total - d0) / n_ev,
                "build_s": build_s,
            }
        )
    return figures[0], figures[1], figures[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1_024)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--small-sessions", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--places", type=int, default=20_000)
    ap.add_argument(
        "--per-event-events",
        type=int,
        default=100_000,
        help="events replayed through the per-event Python path (batch path off)",
    )
    ap.add_argument("--ref-events", type=int, default=20_000)
    ap.add_argument("--ref-places", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill", type=float, default=0.85, help="starting pool fill")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    # the small run goes first: its memory figure would otherwise land in
    # arenas the big run already grew
    small, _, _ = measure(a.workers, a.small_sessions, a.events, a.places // 4, a.fill, a.seed)
    gc.collect()
    main_run, per_event, ref = measure(
        a.workers,
        a.sessions,
        a.events,
        a.places,
        a.fill,
        a.seed,
        a.ref_events,
        a.ref_places,
        a.per_event_events,
    )
    out: dict[str, object] = {
        **main_run,
        "small": small,
        "per_event_path": per_event,
        "reference": ref,
        "speedup_batch_path": main_run["events_per_s"] / per_event["events_per_s"],
        "speedup_events": main_run["events_per_s"] / ref["events_per_s"],
        "speedup_place_p50": ref["place_p50_us"] / main_run["place_p50_us"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "wall_s": time.perf_counter() - t0,
    }
    if a.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"{'':24}{'numba':>14}{'numba small':>14}{'per-event':>14}{'reference':>14}")
    rows = (
        "sessions",
        "events_per_s",
        "place_p50_us",
        "place_p99_us",
        "place_p999_us",
        "bytes_per_session",
        "directives_per_event",
        "build_s",
    )
    for key in rows:
        cells = (main_run[key], small[key], per_event[key], ref[key])
        print(f"{key:24}" + "".join(f"{c:>14,.2f}" for c in cells))
    print(
        f"batch path vs per-event path (events/s): {out['speedup_batch_path']:.1f}x; "
        f"vs reference twins: {out['speedup_events']:.1f}x; "
        f"Place p50: {out['speedup_place_p50']:.1f}x; wall {out['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
