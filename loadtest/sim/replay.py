"""Trace replay through one cache: ``replay_main`` implements ``kvsched replay``.

Formats:

* ``mooncake``: Mooncake FAST'25 JSONL, one request per line with
  ``timestamp``, ``input_length``, ``output_length`` and ``hash_ids`` (ids of
  512-token blocks, in order). Each hash id is one cache object.
* ``kvsched``: the agent-trace JSONL the simulator writes (``simulate
  --trace-out DIR``), one event per line::

      {"t": 12.5, "kind": "step_start", "session": "s3", "tenant": "coding",
       "agent_type": "coding", "step": 4, "context_tokens": 61234,
       "new_tokens": 412, "worker": "r7"}

  ``kind`` is ``step_start``, ``tool_call_wait`` (with ``tool`` and
  ``expected_tool_latency_s``), ``tool_call_end`` or ``session_finish``.
  The LRU and Bélády replays use the step starts: per worker, each session's KV is a prefix of its context, so
  the trace becomes (session, prompt blocks, blocks after the step) requests
  through one cache of ``--capacity-blocks`` blocks per worker.

Policies: ``lru``, ``belady`` (offline, the lower bound on misses) and, for
the agent format, ``kvsched``: the engine's eviction rule with next use
predicted online by the agent execution graph
(``loadtest.sim.replay_cost_aware``). A Mooncake trace has no sessions or
tool waits to predict from, so ``kvsched`` is refused there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.sim.oracle import replay_blocks, replay_sessions
from loadtest.sim.replay_cost_aware import replay_cost_aware


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file (blank lines skipped)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def replay_mooncake(
    rows: Iterable[dict[str, Any]], capacity_blocks: int, policy: str
) -> dict[str, Any]:
    """Hits and misses of Mooncake requests' block ids through one cache."""
    rows = sorted(rows, key=lambda r: r.get("timestamp", 0))
    return replay_blocks([r["hash_ids"] for r in rows], capacity_blocks, policy)


def replay_kvsched(
    rows: Iterable[dict[str, Any]], capacity_blocks: int, policy: str, block_size_tokens: int = 16
) -> dict[str, Any]:
    """Hits and misses of an agent trace's step starts, one cache per worker."""
    if policy == "kvsched":
        return replay_cost_aware(rows, capacity_blocks, block_size_tokens)
    by_worker: dict[str, list[tuple[int, int, int]]] = {}
    ids: dict[str, int] = {}
    starts = sorted((r for r in rows if r.get("kind") == "step_start"), key=lambda r: float(r["t"]))
    for r in starts:
        s = ids.setdefault(str(r["session"]), len(ids))
        ctx = int(r["context_tokens"])
        after = ctx + int(r.get("new_tokens", 0))
        need = -(-ctx // block_size_tokens)
        by_worker.setdefault(str(r.get("worker", "")), []).append(
            (s, need, -(-after // block_size_tokens))
        )
    refs = sum(n for tr in by_worker.values() for _, n, _ in tr)
    misses = sum(replay_sessions(tr, capacity_blocks, policy) for tr in by_worker.values())
    return {
        "requests": len(starts),
        "block_refs": refs,
        "hits": refs - misses,
        "misses": misses,
        "miss_ratio": misses / refs if refs else 0.0,
        "workers": len(by_worker),
    }


def replay_main(argv: Sequence[str]) -> int:
    """``kvsched replay TRACE --format mooncake|kvsched --capacity-blocks N --policy P``."""
    p = argparse.ArgumentParser(prog="kvsched replay", description="Replay a KV trace.")
    p.add_argument("trace")
    p.add_argument("--format", choices=("mooncake", "kvsched"), default="mooncake")
    p.add_argument("--capacity-blocks", type=int, required=True)
    p.add_argument("--policy", choices=("lru", "belady", "kvsched"), default="lru")
    p.add_argument("--block-size-tokens", type=int, default=16, help="kvsched format only")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(list(argv))
    if a.policy == "kvsched" and a.format == "mooncake":
        p.error(
            "--policy kvsched needs agent structure (sessions, tool waits, finishes):"
            " use it with --format kvsched"
        )
    if a.capacity_blocks <= 0:
        p.error(f"--capacity-blocks must be positive, got {a.capacity_blocks}")
    try:
        rows = read_jsonl(a.trace)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"kvsched replay: {exc}", file=sys.stderr)
        return 2
    if a.format == "mooncake":
        out = replay_mooncake(rows, a.capacity_blocks, a.policy)
    else:
        out = replay_kvsched(rows, a.capacity_blocks, a.policy, a.block_size_tokens)
    out = {"format": a.format, "policy": a.policy, "capacity_blocks": a.capacity_blocks, **out}
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(replay_main(sys.argv[1:]))
