"""Workloads, the kvsched policy, the CLI and the report on small runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.sim.cli import JSON_KEYS, simulate_main
from loadtest.sim.run import load_scenario, run_policy, scenario_names
from loadtest.workloads import Arrivals, TenantMix, build

from .conftest import first_tokens, session, tiny_sim


def test_a_seed_fixes_the_workload_and_tenants_are_independent() -> None:
    a = TenantMix("a", Arrivals("mmpp", 0.5), {"coding": 0.5, "rag": 0.5})
    b = TenantMix("b", Arrivals("diurnal", 0.5, period_s=100.0), {"multi_agent": 1.0})
    one = build([a, b], 200.0, 7)
    assert one == build([a, b], 200.0, 7)
    assert one != build([a, b], 200.0, 8)
    alone = [s for s in build([a], 200.0, 7)]
    mixed = [s for s in one if s.tenant_id == "a"]
    assert [s.prompt_tokens for s in alone] == [s.prompt_tokens for s in mixed]


def test_multi_agent_workers_share_the_planners_prefix() -> None:
    m = TenantMix("m", Arrivals("poisson", 0.2), {"multi_agent": 1.0})
    ss = build([m], 100.0, 3)
    planners = [s for s in ss if s.children]
    assert planners
    p = planners[0]
    w = ss[p.children[0]]
    j = p.join_after_step
    assert w.parent == ss.index(p) and w.spawn_after_step == j
    assert w.shared_prefix_tokens == p.context_before_step(j) + p.output_tokens[j]
    assert w.prompt_tokens[0] > w.shared_prefix_tokens


def test_arrival_rates_hold_on_average() -> None:
    import numpy as np

    for kind in ("poisson", "mmpp", "diurnal"):
        t = Arrivals(kind, 2.0, period_s=500.0).times(np.random.default_rng(1), 5000.0)
        assert abs(len(t) / 5000.0 - 2.0) < 0.2, kind
        assert t == sorted(t)


def test_kvsched_policy_drives_the_engine_and_is_reproducible() -> None:
    from loadtest.sim.kvsched_policy import KvschedPolicy

    a = session("a", 0.0, [1600, 160, 160], [160, 16, 16], [1.0, 1.0])
    b = session("b", 0.5, [800, 160], [160, 16], [3.0])
    runs = []
    for _ in range(2):
        pol = KvschedPolicy()
        sim = tiny_sim([a, b], pol, gpus=2, capacity_blocks=1000)
        rec = sim.run()
        runs.append((rec.end_s, rec.hit_tokens, pol.directives, pol.engine.events_total))
    assert runs[0] == runs[1]
    end_s, hits, directives, events = runs[0]
    assert all(t > 0 for t in end_s)
    # per session: a STEP_START per step, TOOL_CALL_WAIT and TOOL_CALL_END per tool call,
    # STEP_END and SESSION_FINISH at the end
    assert events == (3 + 2 + 2 + 2) + (2 + 1 + 1 + 2)
    assert directives > 0 and hits > 0


@pytest.mark.parametrize("name", ["standard", "coding", "mixed", "multitenant", "weighted"])
def test_shipped_scenarios_load(name: str) -> None:
    sc = load_scenario(name, gpus=8)
    assert name in scenario_names()
    assert sc.cluster.replicas == 8 and sc.tenants


def test_every_policy_runs_a_small_standard_scenario() -> None:
    sc = load_scenario("standard", gpus=4, duration_s=120.0)
    for p in ("rr-lru", "vllm-apc", "llmd-prefix", "ttl-pin", "kvsched", "oracle"):
        summary, _, sim = run_policy(sc, p, 1)
        for rep in sim.replicas:
            pool = rep.pool
            assert pool.used == sum(pool.gpu.values()) <= pool.cap, p
            assert pool.host_used == sum(pool.host.values()) <= pool.host_cap, p
            assert set(pool.lru).isdisjoint(pool.lease_until), p
        assert summary["steps_started"] > 50, p
        assert 0.0 <= summary["kv_util"] <= 1.0
        # the oracle replay never loses to a policy on the same placements: a
        # block reloaded from the host tier counts as a miss, as it would in it
        assert summary["oracle_miss_blocks"] <= summary["miss_blocks"], p
        assert summary["misses_vs_oracle"] >= 1.0, p


def test_simulate_json_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = simulate_main(
        [
            "--scenario",
            "standard",
            "--gpus",
            "4",
            "--duration",
            "60",
            "--policies",
            "vllm-apc,ttl-pin",
            "--json",
            "--report",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "standard" and out["seed"] == 1
    assert set(out["policies"]) == {"vllm-apc", "ttl-pin"}
    for m in out["policies"].values():
        assert set(JSON_KEYS) <= set(m)
    assert (tmp_path / "index.html").exists()
    for png in ("completions.png", "kv_util.png", "jct_cdf.png", "tenant_slowdown.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_simulate_rejects_unknown_policy() -> None:
    assert simulate_main(["--policies", "nope"]) == 2


def test_closed_loop_keeps_its_concurrency_and_starts_a_task_when_one_ends() -> None:
    from loadtest.sim.cluster import ClusterConfig
    from loadtest.sim.policies import VllmApc
    from loadtest.sim.simulator import Simulator
    from loadtest.workloads import CLOSED_LOOP

    ss = [session(f"c{i}", CLOSED_LOOP, [320, 16], [32, 16], [1.0]) for i in range(5)]
    sim = Simulator(ss, ClusterConfig(gpus=1), VllmApc(), 200.0, closed_loop={"t": 2})
    rec = sim.run()
    assert rec.start_s[:2] == [0.0, 15.0]  # the first two start spread over 30 s
    assert rec.start_s[2] == rec.end_s[0]  # the third starts when the first ends
    assert rec.start_s[3] == rec.end_s[2]  # which ended before the second did
    assert all(t > 0 for t in rec.end_s)
    ends = sorted(rec.end_s)
    for i, t in enumerate(rec.start_s):
        assert sum(1 for j, e in enumerate(rec.end_s) if rec.start_s[j] <= t < e) <= 2, i
    assert ends[-1] < 200.0


def test_tool_hints_flag_reaches_the_kvsched_policy(tmp_path: Path) -> None:
    from loadtest.sim.run import make_policy

    src = (Path(__file__).resolve().parents[2] / "loadtest/scenarios/coding.toml").read_text()
    path = tmp_path / "hinted.toml"
    path.write_text(src.replace("slo_ttft_s = 2.0", "slo_ttft_s = 2.0\ntool_hints = true"))
    sc = load_scenario(str(path), gpus=2)
    assert sc.tool_hints and not load_scenario("coding").tool_hints
    assert make_policy("kvsched", sc.tool_hints).send_hints is True  # type: ignore[attr-defined]


def test_kvsched_policy_creates_tenants_with_their_weights() -> None:
    from loadtest.sim.kvsched_policy import KvschedPolicy
    from scheduler_service.domain import TenantId

    pol = KvschedPolicy()
    pol.tenant_weights = {"t": 2.0}
    tiny_sim([session("a", 0.0, [160], [16], [])], pol, capacity_blocks=100).run()
    spec = pol.engine.get_tenant(TenantId("t"))
    assert spec is not None and spec.weight == 2.0


def test_the_replica_queue_runs_higher_priority_steps_first() -> None:
    from loadtest.sim.policies import VllmApc

    class Ranked(VllmApc):
        rank = {"a": 0, "b": 1, "c": 5}  # noqa: RUF012

        def step_priority(self, sid: int) -> int:
            return self.rank[self.sessions[sid].session_id]

    # each step needs 70 of the 100 blocks: one runs at a time, the rest queue
    ss = [session(n, t, [1000], [100], []) for n, t in (("a", 0.0), ("b", 0.1), ("c", 0.2))]
    fifo = tiny_sim(ss, VllmApc()).run()
    ranked = tiny_sim(ss, Ranked()).run()
    assert fifo.end_s[0] < fifo.end_s[1] < fifo.end_s[2]  # first come, first served
    # a was running before the others arrived; then c (priority 5) overtakes b
    assert ranked.end_s[0] < ranked.end_s[2] < ranked.end_s[1]


def test_the_prefill_lane_runs_higher_priority_steps_first() -> None:
    from loadtest.sim.policies import VllmApc

    class Ranked(VllmApc):
        rank = {"a": 0, "b": 1, "c": 5}  # noqa: RUF012

        def step_priority(self, sid: int) -> int:
            return self.rank[self.sessions[sid].session_id]

    def prefill_order(policy: VllmApc) -> list[int]:
        # all three fit in memory at once, but prefill is one lane: b and c
        # arrive while a's prefill runs
        ss = [session(n, t, [6000], [50], []) for n, t in (("a", 0.0), ("b", 0.01), ("c", 0.02))]
        sim = tiny_sim(ss, policy, capacity_blocks=2000)
        order = first_tokens(sim)
        sim.run()
        return order

    assert prefill_order(VllmApc()) == [0, 1, 2]
    assert prefill_order(Ranked()) == [0, 2, 1]


def test_a_step_loading_its_kv_from_a_peer_waits_off_the_prefill_lane() -> None:
    from loadtest.sim.policies import VllmApc

    class FromPeer(VllmApc):
        """Everything runs on replica 0; a's KV is on replica 1, which Place names."""

        def place(self, sid: int, step: int, now: float) -> int:
            return 0

        def kv_source(self, sid: int) -> int:
            return 1 if self.sessions[sid].session_id == "a" else -1

    # a (48k tokens, all held by replica 1) arrives first and loads them over two
    # host-link crossings; b (6k tokens, nothing cached) arrives while a's copy runs
    a = session("a", 0.0, [48_000], [50], [])
    b = session("b", 0.01, [6_000], [50], [])
    sim = tiny_sim([a, b], FromPeer(), gpus=2, capacity_blocks=10_000)
    sim.replicas[1].pool.hold(0, 3_000)
    sim.replicas[1].pool.idle(0)
    order = first_tokens(sim)
    sim.run()
    copy_s = 2 * sim.model.reload_s(48_000)
    assert copy_s > 0.01  # the copy outlasts b's arrival
    assert order == [1, 0]  # b was prefilled while a's KV was still coming
    assert sim.rec.moved_tokens == 48_000  # a prefilled nothing it could load
    assert sim.rec.recompute_s == 0.0


def test_kv_transfer_domains_must_hold_whole_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.sim.cluster import ClusterConfig

    with pytest.raises(ValueError, match="multiple of tensor_parallel"):
        ClusterConfig(gpus=16, tensor_parallel=4, kv_transfer_gpus=6)
    argv = ["--gpus", "2", "--duration", "10", "--no-peak", "--kv-transfer-gpus", "-8"]
    assert simulate_main(argv) == 2
    assert "--kv-transfer-gpus" in capsys.readouterr().err
