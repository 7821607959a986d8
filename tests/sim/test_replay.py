"""kvsched replay: Mooncake traces and the simulator's own agent traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert {"step_start", "tool_call_wait", "tool_call_end"} <= kinds
    assert kinds <= {"step_start", "tool_call_wait", "tool_call_end", "session_finish"}
    lru = replay_kvsched(rows, 28_000, "lru")
    opt = replay_kvsched(rows, 28_000, "belady")
    kv = replay_kvsched(rows, 28_000, "kvsched")
    assert opt["misses"] <= kv["misses"] and opt["misses"] <= lru["misses"]
    assert kv["block_refs"] == lru["block_refs"]
    assert lru["requests"] == sum(1 for r in rows if r["kind"] == "step_start")


def _ev(t: float, kind: str, session: str, ctx: int, **kw: object) -> dict:
    return {
        "t": t,
        "kind": kind,
        "session": session,
        "agent_type": "coder",
        "context_tokens": ctx,
        "worker": "r0",
        **kw,
    }


def _wait(t: float, session: str, ctx: int, tool: str, hint_s: float) -> dict:
    return _ev(t, "tool_call_wait", session, ctx, tool=tool, expected_tool_latency_s=hint_s)


# Three sessions of 4 blocks (16-token blocks) through 10 blocks. When c arrives,
# b (least recently used, but its 1 s tool is nearly back) and a (a 100 s test
# run just began) are idle; LRU trims b and misses its blocks when b comes back.
_SHORT_AND_LONG_WAIT = [
    _ev(0.0, "step_start", "b", 64),
    _wait(0.5, "b", 64, "grep", 1.0),
    _ev(0.6, "step_start", "a", 64),
    _wait(0.7, "a", 64, "pytest", 100.0),
    _ev(0.8, "step_start", "c", 64),
    _ev(1.5, "step_start", "b", 64),
]


@pytest.mark.parametrize(("policy", "misses"), [("lru", 14), ("belady", 12), ("kvsched", 12)])
def test_agent_trace_replay_policies_match_hand_computation(policy: str, misses: int) -> None:
    out = replay_kvsched(_SHORT_AND_LONG_WAIT, 10, policy)
    assert (out["requests"], out["block_refs"], out["misses"]) == (4, 16, misses)


def test_kvsched_replay_evicts_finished_sessions_first_and_keeps_returned_tools() -> None:
    rows = [
        _ev(0.0, "step_start", "done", 64),
        _ev(0.4, "session_finish", "done", 64),
        _ev(0.5, "step_start", "back", 64),
        _wait(0.6, "back", 64, "pytest", 100.0),
        _ev(0.7, "step_start", "long", 64),
        _wait(0.8, "long", 64, "pytest", 100.0),
        _ev(0.9, "tool_call_end", "back", 64),  # back early: its next step is queued
        _ev(1.0, "step_start", "new", 128),  # 8 blocks: 16 held of 12 -> trim 4, then 4
        _ev(1.1, "step_start", "back", 64),
        _ev(1.2, "step_start", "long", 64),
    ]
    out = replay_kvsched(rows, 12, "kvsched")
    # done (finished) goes first, then long (waiting on a 100 s tool); back was kept
    assert out["misses"] == 4 + 4 + 4 + 8 + 0 + 4
    lru = replay_kvsched(rows, 12, "lru")
    assert lru["misses"] > out["misses"]


def test_kvsched_policy_is_refused_for_block_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "mc.jsonl"
    _write(trace, [{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}])
    with pytest.raises(SystemExit) as exc:
        replay_main([str(trace), "--capacity-blocks", "4", "--policy", "kvsched"])
    assert exc.value.code == 2
    assert "--format kvsched" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay_main([str(trace), "--capacity-blocks", "0"])
    assert "--capacity-blocks must be positive" in capsys.readouterr().err


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(1, 4),
            st.sampled_from(["grep", "pytest"]),
            st.floats(0.01, 20.0),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(4, 24),
    st.integers(1, 2),
)
def test_belady_never_loses_to_the_kvsched_replay(
    steps: list[tuple[int, int, str, float, bool]], cap: int, workers: int
) -> None:
    # each step: session s adds `add` blocks, waits on a tool for `tool_s` (hinted
    # exactly or not at all), and the tool returns before the session's next step
    rows: list[dict] = []
    ctx: dict[int, int] = {}
    t = 0.0
    for i, (s, add, tool, tool_s, hinted) in enumerate(steps):
        sid = f"s{s}"
        ctx[s] = ctx.get(s, 0) + 16 * add
        t += 1.0
        w = f"r{i % workers if s % 2 else 0}"
        rows.append({**_ev(t, "step_start", sid, ctx[s]), "worker": w})
        rows.append({**_wait(t + 0.5, sid, ctx[s], tool, tool_s if hinted else 0.0), "worker": w})
        rows.append({**_ev(t + 0.5 + tool_s, "tool_call_end", sid, ctx[s]), "worker": w})
    kv = replay_kvsched(rows, cap, "kvsched")
    opt = replay_kvsched(rows, cap, "belady")
    assert kv["block_refs"] == opt["block_refs"]
    assert opt["misses"] <= kv["misses"]
