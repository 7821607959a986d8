"""kvsched replay: Mooncake traces and the simulator's own agent traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.sim.cli import simulate_main
from loadtest.sim.replay import read_jsonl, replay_kvsched, replay_main


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mooncake_replay_counts_block_hits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1536, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 5, "input_length": 1536, "output_length": 10, "hash_ids": [4, 1, 2]},
        {"timestamp": 9, "input_length": 3072, "output_length": 10, "hash_ids": [5, 1, 2, 3, 4, 5]},
    ]
    trace = tmp_path / "mc.jsonl"
    _write(trace, rows)
    for policy, hits in (("lru", 4), ("belady", 6)):
        assert (
            replay_main([str(trace), "--capacity-blocks", "4", "--policy", policy, "--json"]) == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert (out["requests"], out["block_refs"], out["hits"]) == (3, 12, hits)
        assert out["misses"] == 12 - hits


def test_kvsched_trace_replay_uses_step_starts_per_worker() -> None:
    rows = [
        {
            "t": 0.0,
            "kind": "step_start",
            "session": "a",
            "context_tokens": 48,
            "new_tokens": 16,
            "worker": "r0",
        },
        {"t": 1.0, "kind": "tool_call_wait", "session": "a", "context_tokens": 64, "worker": "r0"},
        {
            "t": 2.0,
            "kind": "step_start",
            "session": "a",
            "context_tokens": 80,
            "new_tokens": 16,
            "worker": "r0",
        },
        {
            "t": 2.5,
            "kind": "step_start",
            "session": "b",
            "context_tokens": 32,
            "new_tokens": 0,
            "worker": "r1",
        },
    ]
    out = replay_kvsched(rows, 100, "lru")
    # a: 3 blocks miss, then 5 blocks with 4 held -> 1 miss; b: 2 misses on r1
    assert out == {
        "requests": 3,
        "block_refs": 10,
        "hits": 4,
        "misses": 6,
        "miss_ratio": 0.6,
        "workers": 2,
    }


def test_simulator_trace_round_trips_through_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        simulate_main(
            [
                "--gpus",
                "2",
                "--duration",
                "60",
                "--policies",
                "vllm-apc",
                "--no-peak",
                "--json",
                "--trace-out",
                str(tmp_path),
            ]
        )
        == 0
    )
    capsys.readouterr()
    rows = read_jsonl(str(tmp_path / "vllm-apc.jsonl"))
    kinds = {r["kind"] for r in rows}
    assert kinds <= {"step_start", "tool_call_wait", "session_finish"} and "step_start" in kinds
    lru = replay_kvsched(rows, 28_000, "lru")
    opt = replay_kvsched(rows, 28_000, "belady")
    assert opt["misses"] <= lru["misses"]
    assert lru["requests"] == sum(1 for r in rows if r["kind"] == "step_start")
