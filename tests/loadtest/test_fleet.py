"""The live load test: accounting against a real server, loopback guard, session plans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvsched_client._proto.kvsched.v1 import types_pb2
from loadtest.fleet import (
    baselines,
    check_loopback,
    loadtest_main,
    parse_duration_s,
    run_fleet,
    run_procs,
    spawned_server,
)
from loadtest.fleet_driver import FleetConfig
from loadtest.fleet_metrics import ServerProbe
from loadtest.fleet_sessions import SessionPlan, new_session


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    """One real `kvsched serve` subprocess (SQLite journal) for the module."""
    with spawned_server([]) as target_pid:
        yield target_pid


@pytest.mark.timeout(60)
async def test_every_event_is_acked_or_counted_and_directives_balance(
    server: tuple[str, int],
) -> None:
    target, pid = server
    cfg = FleetConfig(
        target=target,
        workers=4,
        sessions=40,
        rate_per_s=1_500.0,
        duration_s=2.0,
        routers=2,
        place_rps=300.0,
        place_deadline_s=0.05,
        pool_blocks=400,
        drain_s=10.0,
    )
    out: dict[str, Any] = await run_fleet(cfg, ServerProbe(pid))
    # Open loop: every event that came due was handed to a stream ...
    assert out["events_due"] == int(cfg.duration_s * cfg.rate_per_s)
    assert out["events_sent"] == out["events_due"]
    # ... and each one is either acked or counted as an error.
    assert out["events_sent"] == out["events_acked"] + out["errors"].get("unacked", 0)
    assert out["errors"].get("unacked", 0) == 0
    assert out["ack_latencies"] == out["events_acked"]
    assert out["negative_latencies"] == 0
    assert 0 < out["ack_p50_ms"] <= out["ack_p99_ms"] <= out["ack_p999_ms"]
    # Every directive received was answered, and the server acked every answer.
    assert out["directives_received"] == out["directive_acks_acked"]
    assert out["directives_applied"] <= out["directives_received"]
    assert out["place_calls"] > 0 and 0 < out["place_p50_ms"] <= out["place_p99_ms"]
    assert out["server_rss_bytes"] > 0
    per_s = out["series"]["ack"]
    assert sum(int(s["n"]) for s in per_s) == out["events_acked"]


@pytest.mark.timeout(90)
async def test_two_client_processes_add_up_to_one_fleet(server: tuple[str, int]) -> None:
    target, pid = server
    cfg = FleetConfig(
        target=target,
        workers=4,
        sessions=40,
        rate_per_s=600.0,
        duration_s=2.0,
        routers=2,
        place_rps=300.0,
        place_deadline_s=0.05,
    )
    out: dict[str, Any] = await run_procs(cfg, ServerProbe(pid), procs=2)
    assert out["client_processes"] == 2
    # each process offered half the rate: together, the whole schedule
    assert out["events_due"] == out["events_sent"] == int(cfg.duration_s * cfg.rate_per_s)
    assert out["events_sent"] == out["events_acked"] + out["errors"].get("unacked", 0)
    assert out["ack_latencies"] == out["events_acked"] > 0
    assert out["negative_latencies"] == 0
    assert out["directives_received"] == out["directive_acks_acked"]
    # the merged histograms hold every latency of both processes
    assert sum(int(s["n"]) for s in out["series"]["ack"]) == out["events_acked"]
    assert 0 < out["ack_p50_ms"] <= out["ack_p99_ms"]
    assert out["sessions"] == cfg.sessions


@pytest.mark.timeout(30)
@pytest.mark.parametrize("place_stream", [False, True])
async def test_place_only_makes_one_call_per_tick_and_sends_no_events(
    server: tuple[str, int], place_stream: bool
) -> None:
    target, pid = server
    cfg = FleetConfig(
        target=target,
        workers=2,
        sessions=20,
        rate_per_s=200.0,
        duration_s=1.0,
        routers=1,
        place_deadline_s=0.05,
        place_cooldown_s=0.0,
        place_only=True,
        place_stream=place_stream,
    )
    out: dict[str, Any] = await run_fleet(cfg, ServerProbe(pid))
    assert out["events_due"] == 200
    assert out["place_calls"] + out["place_skipped"] == 200
    assert out["events_sent"] == 0 and out["events_acked"] == 0
    assert 0 < out["place_p50_ms"] <= out["place_p99_ms"]
    assert out["negative_latencies"] == 0
    assert out["place_fallback_rate"] < 0.5  # the service answered (unary or on the stream)
    assert out["place_streams"] == (1 if place_stream else 0)  # one router, one stream


@pytest.mark.timeout(60)
async def test_place_baseline_times_echo_and_kvsched_place_at_the_same_rate(
    server: tuple[str, int],
) -> None:
    target, _ = server
    out = await baselines(target, 0.5, streams=1, place_rate_per_s=100.0)
    assert out["echo_events_per_s"] > 0 and out["kvsched_raw_events_per_s"] > 0
    assert out["place_baseline_rate_per_s"] == 100.0
    for name in ("echo_place", "kvsched_raw_place"):
        # every call answered (kvsched has the raw client's worker to place on)
        assert out[f"{name}_errors"] == 0
        assert 0 < out[f"{name}_p50_ms"] <= out[f"{name}_p99_ms"] <= out[f"{name}_p999_ms"]
    assert "echo_place_p50_ms" not in await baselines(target, 0.2, streams=1)


def test_non_loopback_targets_are_refused() -> None:
    assert check_loopback("127.0.0.1:50051") == "127.0.0.1:50051"
    assert check_loopback("[::1]:50051") == "[::1]:50051"
    assert check_loopback("localhost:1") == "localhost:1"
    for bad in ("10.0.0.5:50051", "example.com:50051", "0.0.0.0:1", "127.0.0.1"):
        with pytest.raises(ValueError):
            check_loopback(bad)
    with pytest.raises(SystemExit) as exc:
        loadtest_main(["--target", "192.168.1.10:50051", "--duration", "1s"])
    assert exc.value.code == 2


def test_durations_parse_with_units() -> None:
    assert parse_duration_s("60s") == 60.0
    assert parse_duration_s("2m") == 120.0
    assert parse_duration_s("500ms") == 0.5
    assert parse_duration_s("3") == 3.0


def test_a_plan_reports_its_steps_in_order_with_growing_context() -> None:
    plan = SessionPlan(
        "s",
        "t",
        "coding",
        np.array([100, 40], dtype=np.int32),
        np.array([10, 5], dtype=np.int32),
        np.array([0, 0], dtype=np.int16),
    )
    got = []
    while not plan.done:
        got.append(plan.take())
    assert got == [
        (types_pb2.STEP_START, 0, 100, 100, ""),
        (types_pb2.STEP_END, 0, 110, 10, ""),
        (types_pb2.TOOL_CALL_WAIT, 0, 110, 0, ""),
        (types_pb2.TOOL_CALL_END, 0, 110, 0, ""),
        (types_pb2.STEP_START, 1, 150, 40, ""),
        (types_pb2.STEP_END, 1, 155, 5, ""),
        (types_pb2.SESSION_FINISH, 1, 155, 0, ""),
    ]
    assert plan.events_total == 7


def test_sessions_come_from_the_shared_coding_generator() -> None:
    rng = np.random.default_rng(7)
    plan = new_session(rng, "coding", "s0", "t0")
    assert 8 <= plan.steps <= 150
    # coding: 8-30k first prompt, then 3-7k tokens appended per step
    assert 8_000 <= int(plan.prompt_tokens[0]) < 30_000
    assert all(3_000 <= int(x) < 7_000 for x in plan.prompt_tokens[1:])
    again = new_session(np.random.default_rng(7), "coding", "s0", "t0")
    assert json.dumps(again.prompt_tokens.tolist()) == json.dumps(plan.prompt_tokens.tolist())


def test_report_writes_a_page_and_three_plots(tmp_path: Any) -> None:
    from loadtest.fleet_metrics import LatencySeries
    from loadtest.fleet_report import write_report

    lat = LatencySeries()
    for i in range(200):
        lat.record(0.001 * (1 + i % 7), i / 100.0)
    out = {
        "events_per_s": 100.0,
        "ack_p99_ms": lat.pct_ms(99),
        "errors": {},
        "offered_events_per_s": 100.0,
        "series": {"ack": lat.series(), "place": [], "ack_cdf": lat.cdf(), "place_cdf": []},
    }
    page = write_report(out, tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == [
        "index.html",
        "latency_cdf.png",
        "latency_over_time.png",
        "result.json",
        "throughput_over_time.png",
    ]
    assert "latency_cdf.png" in page.read_text()
    assert [int(s["n"]) for s in lat.series()] == [100, 100]


@pytest.mark.timeout(90)
def test_the_cli_runs_a_short_fleet_and_names_its_event_loop(
    server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    target, pid = server
    argv = ["--target", target, "--server-pid", str(pid), "--workers", "2", "--sessions", "10"]
    argv += ["--rate", "200", "--duration", "1s", "--json"]
    assert loadtest_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        expected = "uvloop"
    except ImportError:
        expected = "asyncio"
    assert out["event_loop"] == expected
    assert out["events_sent"] == out["events_acked"] + out["errors"].get("unacked", 0) == 200
