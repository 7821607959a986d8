"""``kvsched replay --policy kvsched``: an agent trace through the engine's eviction rule.

The LRU and Bélády replays (``loadtest.sim.oracle``) see only when each
session's blocks are used. This replay sees what the engine sees, in trace
order and with no knowledge of the future: a session's step starts, its tool
waits (tool name and declared latency), its finish. Each agent type's
execution graph (``scheduler_service.graph``) learns tool durations and
outcomes online from the trace; when a worker's cache is over capacity, the
victim is the session with the highest eviction key of the engine's kernel
(``victim_key``: predicted time to next use ÷ P(continue) × blocks ÷ rebuild
cost), trimmed tail first as in the other session replays. A session is

* waiting: next use = now + the graph's expected remaining tool time, given
  the time already waited (a declared latency counts as a hint);
* running (its step started and has not ended): next use now, kept;
* finished, or moved to another worker: never used here again, evicted first.

Ties go to the least recently used session. The prefill rate cancels out of
the ranking (every key on one worker is divided by it), so keys are computed
at 1 token/s with the default attention knee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scheduler_service.costs import DEFAULT_ATTENTION_KNEE_TOKENS
from scheduler_service.domain import EventKind
from scheduler_service.graph import AgentGraph, GraphStore
from scheduler_service.kernels import NUMBA, KernelSet

_RUNNING, _WAITING, _READY, _GONE = 0, 1, 2, 3


@dataclass(slots=True)
class _Session:
    graph: AgentGraph
    state: int = _RUNNING
    worker: str = ""
    node: int = -1
    wait_started: float = 0.0
    hint_s: float = 0.0
    tokens_at_wait: int = 0
    tokens: int = 0
    last_use: int = 0


def replay_cost_aware(
    rows: Iterable[dict[str, Any]],
    capacity_blocks: int,
    block_size_tokens: int = 16,
    kernels: KernelSet = NUMBA,
) -> dict[str, Any]:
    """Hits and misses of an agent trace's step starts, one cache per worker."""
    events = sorted(rows, key=lambda r: float(r["t"]))
    graphs = GraphStore()
    agents: dict[str, int] = {}
    sessions: dict[str, _Session] = {}
    caches: dict[str, dict[str, int]] = {}
    used: dict[str, int] = {}
    requests = refs = misses = clock = 0
    for r in events:
        sid, kind, now = str(r["session"]), r["kind"], float(r["t"])
        s = sessions.get(sid)
        if s is None:
            agent = str(r.get("agent_type", ""))
            g = graphs.for_agent(agents.setdefault(agent, len(agents)), agent)
            s = sessions[sid] = _Session(g)
        ctx = int(r.get("context_tokens", 0))
        if kind == "tool_call_wait":
            hint = float(r.get("expected_tool_latency_s") or 0.0)
            key = (int(EventKind.TOOL_CALL_WAIT), str(r.get("tool", "")))
            s.node = s.graph.node(key, now, hint)
            s.state, s.wait_started, s.hint_s = _WAITING, now, hint
            s.tokens_at_wait = s.tokens = ctx
        elif kind == "tool_call_end":
            if s.state == _WAITING:
                # the wait in its node ends here, as the engine learns it at TOOL_CALL_END
                s.graph.observe_duration(s.node, now - s.wait_started, now)
                s.state = _READY
        elif kind == "session_finish":
            s.state = _GONE
        elif kind == "step_start":
            if s.node >= 0:
                if s.state == _WAITING:  # no tool_call_end: the wait ends at the step
                    s.graph.observe_duration(s.node, now - s.wait_started, now)
                s.graph.observe_outcome(s.node, True, now)
                s.graph.observe_tokens(s.node, max(0, ctx - s.tokens_at_wait), now)
                s.node = -1
            w = str(r.get("worker", ""))
            s.state, s.worker, s.tokens = _RUNNING, w, ctx
            clock += 1
            s.last_use = clock
            cache = caches.setdefault(w, {})
            need = -(-ctx // block_size_tokens)
            after = -(-(ctx + int(r.get("new_tokens", 0))) // block_size_tokens)
            have = cache.get(sid, 0)
            requests += 1
            refs += need
            misses += need - min(have, need)
            after = min(max(after, need), capacity_blocks)
            used[w] = used.get(w, 0) + after - have
            cache[sid] = after
            while used[w] > capacity_blocks:
                v = _victim(cache, sessions, sid, w, now, kernels)
                if v is None:
                    break
                take = min(cache[v], used[w] - capacity_blocks)
                cache[v] -= take
                used[w] -= take
                if cache[v] == 0:
                    del cache[v]
    return {
        "requests": requests,
        "block_refs": refs,
        "hits": refs - misses,
        "misses": misses,
        "miss_ratio": misses / refs if refs else 0.0,
        "workers": len(caches),
    }


def _victim(
    cache: dict[str, int],
    sessions: dict[str, _Session],
    current: str,
    worker: str,
    now: float,
    kernels: KernelSet,
) -> str | None:
    """The session of ``cache`` (not ``current``) with the highest eviction key."""
    best: str | None = None
    best_key = (-math.inf, 0)
    for sid, blocks in cache.items():
        if sid == current:
            continue
        s = sessions[sid]
        if s.state == _GONE or s.worker != worker:
            key = math.inf
        elif s.state in (_RUNNING, _READY):
            key = kernels.victim_key(
                now, now, 1.0, blocks, s.tokens, 1.0, DEFAULT_ATTENTION_KNEE_TOKENS, 1.0
            )
        else:
            pred = s.graph.predict(
                s.node, now - s.wait_started, now, kernels.remaining_time, s.hint_s
            )
            key = kernels.victim_key(
                now + pred.expected_remaining_s,
                now,
                pred.p_continue,
                blocks,
                s.tokens,
                1.0,
                DEFAULT_ATTENTION_KNEE_TOKENS,
                1.0,
            )
        # the older last use wins a tie
        if (key, -s.last_use) > best_key:
            best, best_key = sid, (key, -s.last_use)
    return best
