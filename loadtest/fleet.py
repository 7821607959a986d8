"""``kvsched loadtest``: a synthetic agent fleet against a live kvsched on loopback.

One run: open a fleet (``fleet_driver``), drive it open-loop for ``--duration``,
drain, print a summary (or ``--json``). ``--ramp`` raises the rate step by step
until ack p99 passes ``--ramp-p99-ms`` and reports the knee, next to a raw grpcio
echo baseline and the same raw client against kvsched, all measured in one run.
Only loopback targets are accepted: this tool floods whatever it is pointed at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.echo import echo_client, place_client
from loadtest.fleet_driver import Fleet, FleetConfig
from loadtest.fleet_metrics import Recorder, ServerProbe, summary
from loadtest.fleet_sessions import SCENARIOS

__all__ = ["check_loopback", "loadtest_main", "run_fleet", "spawned_server"]

ROOT = Path(__file__).resolve().parent.parent


def check_loopback(target: str) -> str:
    """Returns `target` if its host is a loopback address; raises ValueError otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} is not HOST:PORT")
    host = host.strip("[]")
    if host == "localhost":
        return target
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"target host {host!r} is not a loopback address") from None
    if not ip.is_loopback:
        raise ValueError(
            f"refusing non-loopback target {target!r}: load tests run on loopback only"
        )
    return target


def parse_duration_s(text: str) -> float:
    """Parses '60s', '2m', '500ms' or a bare number of seconds."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return float(t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(target: str, timeout_s: float) -> None:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


@contextlib.contextmanager
def spawned_server(
    server_args: list[str], log_path: str | None = None
) -> Iterator[tuple[str, int]]:
    """Starts `kvsched serve` on a free loopback port (auth off); yields (target, pid).

    The server's log (stderr) goes to `log_path` when given, else nowhere.
    """
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="kvsched-loadtest-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "kvsched",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            tmp,
            "--auth",
            "none",
            "--metrics-port",
            "0",
            "--log-level",
            "warning",
            *server_args,
        ]
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_healthy(f"127.0.0.1:{port}", 60.0)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not isinstance(log, int):
                log.close()


@contextlib.contextmanager
def spawned_echo() -> Iterator[str]:
    """Starts the raw grpcio echo server in its own process; yields its target."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.echo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_fleet(
    cfg: FleetConfig,
    probe: ServerProbe | None = None,
    live: bool = False,
    sink: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs one fleet against `cfg.target`; returns the summary dict.

    With `sink`, also leaves the raw recorder there (`rec`, `elapsed_s`,
    `client_cpu_s`): a child of a `--procs` run hands that to its parent.
    """
    probe = probe or ServerProbe(None)
    rec = Recorder()
    fleet = Fleet(cfg, rec)
    await fleet.start()
    cpu0 = probe.cpu_s()
    rss0 = probe.rss_bytes()
    client_cpu0 = time.process_time()
    rss_series: list[tuple[float, int]] = []
    display = asyncio.create_task(_sample(fleet, probe, rss_series, live))
    try:
        elapsed_s = await fleet.run()
    finally:
        display.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await display
        await fleet.stop()
    client_cpu_s = time.process_time() - client_cpu0
    if sink is not None:
        sink.update(rec=rec, elapsed_s=elapsed_s, client_cpu_s=client_cpu_s)
    return _summary(cfg, rec, elapsed_s, probe, cpu0, rss0, client_cpu_s, rss_series)


def _summary(
    cfg: FleetConfig,
    rec: Recorder,
    elapsed_s: float,
    probe: ServerProbe,
    cpu0: float,
    rss0: int,
    client_cpu_s: float,
    rss_series: list[tuple[float, int]],
) -> dict[str, Any]:
    rss = probe.rss_bytes()
    cpu_s = probe.cpu_s() - cpu0
    out = summary(
        rec,
        elapsed_s,
        {
            "server_rss_bytes": rss,
            "server_peak_rss_bytes": probe.peak_rss_bytes,
            "server_cpu_s": round(cpu_s, 2),
            "server_cpu_share": round(cpu_s / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            # All client processes together: near their core count means the
            # generator, not the server, is the limit.
            "client_cpu_share": round(client_cpu_s / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            # Growth over the run's start, so the server's fixed footprint is not spread in.
            "server_rss_growth_per_session_bytes": round((rss - rss0) / rec.sessions_started)
            if rec.sessions_started and rss
            else 0,
            "offered_events_per_s": cfg.rate_per_s,
            "workers": cfg.workers,
            "live_sessions": cfg.sessions,
            "duration_s": cfg.duration_s,
            "scenario": cfg.scenario,
        },
    )
    out["series"] = {
        "ack": rec.ack.series(),
        "place": rec.place.series(),
        "rss": rss_series,
        "ack_cdf": rec.ack.cdf(),
        "place_cdf": rec.place.cdf(),
    }
    return out


async def run_procs(cfg: FleetConfig, probe: ServerProbe, procs: int) -> dict[str, Any]:
    """Runs the fleet as `procs` client processes (each a share of it); merges their results.

    For when one client process cannot offer the load: each child is a
    `kvsched loadtest` with its share of the workers, sessions and rates and
    its own seed, writing its raw recorder to a file the parent merges
    (HDR histograms add exactly). The server is measured here, over the whole run.
    """
    cpu0 = probe.cpu_s()
    rss0 = probe.rss_bytes()
    rss_series: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvsched-loadtest-procs-") as tmp:
        outs = [Path(tmp) / f"child{i}.json" for i in range(procs)]
        children = []
        for i, out in enumerate(outs):
            # NOTE: the child's whole FleetConfig travels as JSON, so no flag is
            # restated here; the child takes it instead of building one from flags.
            spec = Path(tmp) / f"child{i}.config.json"
            spec.write_text(json.dumps(asdict(_child_config(cfg, procs, i))))
            argv = ["--target", cfg.target, "--child-config", str(spec), "--child-out", str(out)]
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "kvsched",
                    "loadtest",
                    *argv,
                    "--json",
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        waits = [asyncio.create_task(c.communicate()) for c in children]
        while not all(w.done() for w in waits):
            await asyncio.wait(waits, timeout=1.0)
            rss_series.append((time.perf_counter() - t0, probe.rss_bytes()))
        for i, (c, w) in enumerate(zip(children, waits, strict=True)):
            if c.returncode != 0:
                err = w.result()[1].decode(errors="replace")[-2000:]
                raise RuntimeError(f"client process {i} exited {c.returncode}: {err}")
        rec = Recorder()
        elapsed_s = client_cpu_s = 0.0
        for out in outs:
            part = json.loads(out.read_text())
            rec.merge_wire(part["rec"])
            elapsed_s = max(elapsed_s, float(part["elapsed_s"]))
            client_cpu_s += float(part["client_cpu_s"])
    result = _summary(cfg, rec, elapsed_s, probe, cpu0, rss0, client_cpu_s, rss_series)
    result["client_processes"] = procs
    return result


def _event_loop() -> tuple[str, Any]:
    """("uvloop", uvloop.run) when uvloop is installed (a faster loop for the generator),
    else ("asyncio", asyncio.run)."""
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def _child_config(cfg: FleetConfig, procs: int, i: int) -> FleetConfig:
    """Child ``i`` of ``procs``: its share of the workers, sessions and rates, its own seed."""

    def share(total: int) -> int:
        return total // procs + (1 if i < total % procs else 0)

    return replace(
        cfg,
        workers=share(cfg.workers),
        sessions=share(cfg.sessions),
        rate_per_s=cfg.rate_per_s / procs,
        routers=max(1, share(cfg.routers)),
        place_rps=cfg.place_rps / procs,
        seed=cfg.seed * 1_000 + i,
    )


async def _sample(
    fleet: Fleet, probe: ServerProbe, rss_series: list[tuple[float, int]], live: bool
) -> None:
    """Samples server RSS once a second and refreshes the live display."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        p = fleet.progress()
        t = Table(title=f"kvsched loadtest → {fleet.cfg.target}", show_header=False)
        t.add_row("elapsed", f"{p['elapsed_s']:.1f} / {fleet.cfg.duration_s:.0f} s")
        t.add_row("events acked", f"{p['events_acked']:,.0f} ({p['events_per_s']:,.0f}/s)")
        t.add_row("in flight", f"{p['in_flight']:,.0f}")
        t.add_row("ack p99", f"{p['ack_p99_ms']:.2f} ms")
        t.add_row("Place p99", f"{p['place_p99_ms']:.2f} ms ({p['place_calls']:,.0f} calls)")
        t.add_row("sessions started", f"{p['sessions']:,.0f}")
        t.add_row("errors", f"{p['errors']:,.0f}")
        t.add_row("server RSS", f"{probe.rss_bytes() / 2**20:,.0f} MiB")
        return t

    t0 = time.perf_counter()
    ctx: Any = (
        Live(table(), console=Console(stderr=True), refresh_per_second=2, transient=True)
        if live
        else contextlib.nullcontext()
    )
    with ctx as view:
        while True:
            await asyncio.sleep(0.5 if live else 1.0)
            rss_series.append((time.perf_counter() - t0, probe.rss_bytes()))
            if view is not None:
                view.update(table())


async def run_ramp(
    base: FleetConfig, rates: list[float], p99_ms: float, probe: ServerProbe, step_s: float
) -> dict[str, Any]:
    """Runs one fleet per rate until ack p99 passes `p99_ms`; returns steps and the knee."""
    steps: list[dict[str, Any]] = []
    knee = 0.0
    for rate in rates:
        cfg = FleetConfig(**{**_fields(base), "rate_per_s": rate, "duration_s": step_s})
        r = await run_fleet(cfg, probe)
        r.pop("series")
        steps.append(r)
        kept_up = r["events_per_s"] >= 0.9 * rate and not r["errors"].get("unacked")
        if r["ack_p99_ms"] > p99_ms or not kept_up:
            break
        knee = max(knee, r["events_per_s"])
    return {"ramp_steps": steps, "knee_events_per_s": knee, "ramp_p99_ms": p99_ms}


def _fields(cfg: FleetConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


async def baselines(
    kvsched_target: str, seconds: float, streams: int, place_rate_per_s: float = 0.0
) -> dict[str, float]:
    """The raw clients against grpcio echo and against kvsched, in one run.

    With `place_rate_per_s`, also Place at that rate through one raw unary client:
    against the echo (what a grpcio unary call costs here) and against kvsched.
    """
    with spawned_echo() as echo_target:
        echo = await echo_client(echo_target, streams=streams, seconds=seconds)
        if place_rate_per_s:
            echo_place = await place_client(
                echo_target, rate_per_s=place_rate_per_s, seconds=seconds
            )
    out: dict[str, float] = {}
    if place_rate_per_s:
        # NOTE: before the raw event flood below, whose last windows the server is
        # still applying when that client stops: Place calls would queue behind them.
        raw_place = await place_client(
            kvsched_target, rate_per_s=place_rate_per_s, seconds=seconds, with_worker=True
        )
        # one client process at the whole run's rate, whatever --procs the fleet used
        out["place_baseline_rate_per_s"] = place_rate_per_s
        for name, r in (("echo_place", echo_place), ("kvsched_raw_place", raw_place)):
            for k in ("p50_ms", "p99_ms", "p999_ms", "errors"):
                out[f"{name}_{k}"] = round(r[k], 3)
    raw = await echo_client(kvsched_target, streams=streams, seconds=seconds, with_hello=True)
    out["echo_events_per_s"] = round(echo, 1)
    out["kvsched_raw_events_per_s"] = round(raw, 1)
    out["kvsched_vs_echo"] = round(raw / echo, 4) if echo else 0.0
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsched loadtest", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server (loopback only)")
    where.add_argument("--spawn-server", action="store_true", help="start a local server")
    p.add_argument("--server-arg", action="append", default=[], help="extra `kvsched serve` flag")
    p.add_argument("--server-log", help="with --spawn-server: write its log here")
    p.add_argument("--server-pid", type=int, help="pid of --target's server (RSS and CPU)")
    p.add_argument("--token", help="bearer token (worker + router roles) for --auth token")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--sessions", type=int, default=5000, help="live sessions kept open")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="coding")
    p.add_argument("--rate", type=float, default=20_000.0, help="offered session events/s")
    p.add_argument("--duration", default="60s")
    p.add_argument("--routers", type=int, default=4)
    p.add_argument("--place-rps", type=float, default=2_000.0, help="Place calls/s at most")
    p.add_argument("--place-deadline-ms", type=float, default=10.0)
    p.add_argument(
        "--place-cooldown-ms",
        type=float,
        default=100.0,
        help="after a failed Place the router falls back without calling for this long",
    )
    p.add_argument(
        "--place-stream",
        action="store_true",
        help="routers place over one PlaceStream each instead of a unary call per step",
    )
    p.add_argument("--no-pools", action="store_true", help="no reference KV pools")
    p.add_argument(
        "--place-only", action="store_true", help="only Place calls, --rate of them per second"
    )
    p.add_argument(
        "--batch-delay-ms",
        type=float,
        default=2.0,
        help="how long a worker waits to fill a batch (WorkerClient default 2 ms)",
    )
    p.add_argument(
        "--message-per-kind",
        action="store_true",
        help="one message per kind of input instead of one WorkerBatch (the older framing)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ramp", help="START:STEP:MAX events/s; stops at the knee")
    p.add_argument("--ramp-p99-ms", type=float, default=10.0)
    p.add_argument("--baseline", action="store_true", help="also measure the echo baseline")
    p.add_argument("--baseline-s", type=float, default=5.0)
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="client processes (each drives a share of the fleet) when one core is not enough",
    )
    p.add_argument("--child-out", help=argparse.SUPPRESS)  # a --procs child's raw results
    p.add_argument("--child-config", help=argparse.SUPPRESS)  # a --procs child's FleetConfig
    p.add_argument("--report", help="write index.html and PNG plots into this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


_MAX_WORKERS = 1024
_MAX_SESSIONS = 1_000_000
_MAX_DURATION_S = 3_600.0
_MAX_RATE = 1_000_000.0
_MAX_PROCS = 16


def _child_fleet(path: str) -> FleetConfig:
    """The FleetConfig a --procs parent wrote for this child."""
    cfg = FleetConfig(**json.loads(Path(path).read_text()))
    check_loopback(cfg.target)
    return cfg


def loadtest_main(argv: list[str]) -> int:
    """`kvsched loadtest`: runs the fleet (or a ramp); returns the exit code."""
    p = _parser()
    ns = p.parse_args(argv)
    try:
        duration_s = parse_duration_s(ns.duration)
        if ns.target:
            check_loopback(ns.target)
    except ValueError as exc:
        p.error(str(exc))
    if not (1 <= ns.workers <= _MAX_WORKERS and 1 <= ns.sessions <= _MAX_SESSIONS):
        p.error(f"--workers in 1..{_MAX_WORKERS}, --sessions in 1..{_MAX_SESSIONS}")
    if not (0 < duration_s <= _MAX_DURATION_S and 0 < ns.rate <= _MAX_RATE):
        p.error(f"--duration in (0, {_MAX_DURATION_S:.0f}s], --rate in (0, {_MAX_RATE:.0f}]")
    if not 1 <= ns.procs <= _MAX_PROCS:
        p.error(f"--procs in 1..{_MAX_PROCS}")
    if ns.procs > 1 and (ns.ramp or ns.workers < ns.procs):
        p.error("--procs wants no --ramp and at least one worker per process")
    rates: list[float] = []
    if ns.ramp:
        try:
            start, step, stop = (float(x) for x in ns.ramp.split(":"))
        except ValueError:
            p.error("--ramp wants START:STEP:MAX")
        if start <= 0 or step <= 0 or stop < start or (stop - start) / step > 100:
            p.error("--ramp wants 0 < START <= MAX and at most 100 steps")
        rates = [start + i * step for i in range(int((stop - start) // step) + 1)]
    with contextlib.ExitStack() as stack:
        if ns.spawn_server:
            target, pid = stack.enter_context(spawned_server(ns.server_arg, ns.server_log))
        else:
            target, pid = ns.target, ns.server_pid
        cfg = (
            _child_fleet(ns.child_config)
            if ns.child_config
            else FleetConfig(
                target=target,
                workers=ns.workers,
                sessions=ns.sessions,
                rate_per_s=ns.rate,
                duration_s=duration_s,
                scenario=ns.scenario,
                routers=ns.routers,
                place_rps=ns.place_rps,
                place_deadline_s=ns.place_deadline_ms / 1000.0,
                place_cooldown_s=ns.place_cooldown_ms / 1000.0,
                pools=not ns.no_pools,
                place_only=ns.place_only,
                batch_delay_s=ns.batch_delay_ms / 1000.0,
                combine_messages=not ns.message_per_kind,
                place_stream=ns.place_stream,
                seed=ns.seed,
                token=ns.token,
            )
        )
        probe = ServerProbe(pid)
        live = not ns.json and sys.stderr.isatty()
        loop_name, runner = _event_loop()
        out = runner(_main(cfg, probe, live, rates, ns, duration_s))
        out["event_loop"] = loop_name
    out["command"] = "kvsched loadtest " + " ".join(argv)
    out["machine"] = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    out["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if ns.report:
        from loadtest.fleet_report import write_report

        write_report(out, Path(ns.report))
    if ns.json:
        out.pop("series", None)
        print(json.dumps(out))
    else:
        _print_summary(out)
    return 0


async def _main(
    cfg: FleetConfig,
    probe: ServerProbe,
    live: bool,
    rates: list[float],
    ns: argparse.Namespace,
    duration_s: float,
) -> dict[str, Any]:
    if rates:
        out = await run_ramp(cfg, rates, ns.ramp_p99_ms, probe, duration_s)
    elif ns.procs > 1:
        out = await run_procs(cfg, probe, ns.procs)
    elif ns.child_out:
        sink: dict[str, Any] = {}
        out = await run_fleet(cfg, probe, False, sink)
        Path(ns.child_out).write_text(
            json.dumps(
                {
                    "rec": sink["rec"].to_wire(),
                    "elapsed_s": sink["elapsed_s"],
                    "client_cpu_s": sink["client_cpu_s"],
                }
            )
        )
    else:
        out = await run_fleet(cfg, probe, live)
    if ns.baseline or rates:
        base = await baselines(
            cfg.target,
            ns.baseline_s,
            streams=4,
            place_rate_per_s=cfg.rate_per_s if cfg.place_only else 0.0,
        )
        out.update(base)
        fleet_rate = out.get("knee_events_per_s") or out.get("events_per_s", 0.0)
        echo = base["echo_events_per_s"]
        out["fleet_vs_echo"] = round(fleet_rate / echo, 4) if echo else 0.0
    return out


def _print_summary(out: dict[str, Any]) -> None:
    keys = [k for k in out if k not in ("series", "ramp_steps")]
    for k in keys:
        print(f"{k:>30}: {out[k]}")
    for s in out.get("ramp_steps", []):
        print(
            f"  ramp {s['offered_events_per_s']:>9,.0f}/s offered → {s['events_per_s']:>9,.0f}/s"
            f"  ack p99 {s['ack_p99_ms']:.2f} ms  Place p99 {s['place_p99_ms']:.2f} ms"
        )
