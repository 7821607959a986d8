"""What a live load test measures: HDR histograms, per-second series, error counts."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["LatencySeries", "Recorder", "ServerProbe"]

_MAX_US = 120_000_000  # two minutes: anything slower is clamped, not lost


def _hist() -> HdrHistogram:
    return HdrHistogram(1, _MAX_US, 3)


class LatencySeries:
    """One latency: a whole-run histogram plus one histogram per second of the run."""

    def __init__(self) -> None:
        self.total = _hist()
        self.per_s: dict[int, HdrHistogram] = {}
        self.count = 0
        self.negative = 0  # must stay 0: a latency below zero is a clock bug

    def record(self, latency_s: float, at_s: float) -> None:
        """Records one latency (seconds) observed `at_s` seconds into the run."""
        if latency_s < 0:
            self.negative += 1
            latency_s = 0.0
        us = min(_MAX_US, max(1, int(latency_s * 1e6)))
        self.total.record_value(us)
        sec = int(at_s)
        h = self.per_s.get(sec)
        if h is None:
            h = self.per_s[sec] = _hist()
        h.record_value(us)
        self.count += 1

    def pct_ms(self, pct: float) -> float:
        """Returns the whole-run percentile in milliseconds (0 when empty)."""
        if self.count == 0:
            return 0.0
        return float(self.total.get_value_at_percentile(pct)) / 1000.0

    def series(self) -> list[dict[str, float]]:
        """Returns per-second {t_s, n, p50_ms, p99_ms, max_ms}, in time order."""
        out = []
        for sec in sorted(self.per_s):
            h = self.per_s[sec]
            out.append(
                {
                    "t_s": float(sec),
                    "n": float(h.get_total_count()),
                    "p50_ms": h.get_value_at_percentile(50) / 1000.0,
                    "p99_ms": h.get_value_at_percentile(99) / 1000.0,
                    "max_ms": h.get_max_value() / 1000.0,
                }
            )
        return out

    def to_wire(self) -> dict[str, Any]:
        """The histograms, HDR-encoded, for another process to merge."""
        return {
            "total": self.total.encode().decode("ascii"),
            "per_s": {str(k): h.encode().decode("ascii") for k, h in self.per_s.items()},
            "count": self.count,
            "negative": self.negative,
        }

    def merge_wire(self, w: dict[str, Any]) -> None:
        """Adds another process's latencies (from `to_wire`) to these."""
        self.total.add(HdrHistogram.decode(w["total"].encode("ascii")))
        for k, enc in w["per_s"].items():
            h = self.per_s.get(int(k))
            if h is None:
                h = self.per_s[int(k)] = _hist()
            h.add(HdrHistogram.decode(enc.encode("ascii")))
        self.count += int(w["count"])
        self.negative += int(w["negative"])

    def cdf(self) -> list[tuple[float, float]]:
        """Returns (latency_ms, fraction <= it) points of the whole run."""
        if self.count == 0:
            return []
        pts = []
        for pct in (
            *range(1, 100),
            99.5,
            99.9,
            99.95,
            99.99,
            100.0,
        ):
            pts.append((self.total.get_value_at_percentile(pct) / 1000.0, pct / 100.0))
        return pts


@dataclass(slots=True)
class Recorder:
    """Counters of one run (see `LatencySeries` for the latencies)."""

    ack: LatencySeries = field(default_factory=LatencySeries)
    place: LatencySeries = field(default_factory=LatencySeries)
    events_sent: int = 0  # handed to a worker stream
    events_acked: int = 0
    events_due: int = 0  # reached their intended time
    place_calls: int = 0
    place_fallbacks: int = 0
    place_skipped: int = 0  # over --place-rps: the step kept its worker
    place_streams: int = 0  # PlaceStreams the routers opened (--place-stream)
    directives_received: int = 0
    directives_applied: int = 0
    directive_acks_acked: int = 0
    kv_batches_acked: int = 0
    pool_exhausted: int = 0
    sessions_started: int = 0
    sessions_finished: int = 0
    messages_framed: int = 0  # upstream stream messages (events, KV, directive acks, heartbeats)
    errors: Counter[str] = field(default_factory=Counter)

    def to_wire(self) -> dict[str, Any]:
        """Everything recorded, as JSON-able data another process can merge."""
        out: dict[str, Any] = {f: getattr(self, f) for f in _COUNTS}
        out["errors"] = dict(self.errors)
        out["ack"] = self.ack.to_wire()
        out["place"] = self.place.to_wire()
        return out

    def merge_wire(self, w: dict[str, Any]) -> None:
        """Adds another process's recorder (from `to_wire`) to this one."""
        for f in _COUNTS:
            setattr(self, f, getattr(self, f) + int(w[f]))
        self.errors.update(w["errors"])
        self.ack.merge_wire(w["ack"])
        self.place.merge_wire(w["place"])

    def events_per_s_series(self) -> list[tuple[float, float]]:
        """Returns (t_s, events acked in that second) from the ack histograms."""
        return [(float(s), float(h.get_total_count())) for s, h in sorted(self.ack.per_s.items())]


_COUNTS = tuple(f for f in Recorder.__dataclass_fields__ if f not in ("ack", "place", "errors"))


class ServerProbe:
    """Reads a server process's RSS and CPU time from /proc (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_rss_bytes = 0
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if pid else 100

    def rss_bytes(self) -> int:
        """Returns the current RSS (0 when unknown); tracks the peak."""
        if not self.pid:
            return 0
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
                        return rss
        except OSError:
            return 0
        return 0

    def cpu_s(self) -> float:
        """Returns user + system CPU seconds the process used (0 when unknown)."""
        if not self.pid:
            return 0.0
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # fields[11], [12] are utime, stime (fields 14 and 15 of proc(5)).
        return (int(fields[11]) + int(fields[12])) / self._ticks_per_s


def summary(rec: Recorder, elapsed_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Returns the one-object result of a run (the `--json` keys first)."""
    calls = rec.place_calls
    out: dict[str, Any] = {
        "events_per_s": round(rec.events_acked / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "ack_p50_ms": rec.ack.pct_ms(50),
        "ack_p99_ms": rec.ack.pct_ms(99),
        "ack_p999_ms": rec.ack.pct_ms(99.9),
        "place_p50_ms": rec.place.pct_ms(50),
        "place_p99_ms": rec.place.pct_ms(99),
        "place_p999_ms": rec.place.pct_ms(99.9),
        "place_fallback_rate": round(rec.place_fallbacks / calls, 6) if calls else 0.0,
        "directives_applied": rec.directives_applied,
        "errors": dict(sorted(rec.errors.items())),
        "sessions": rec.sessions_started,
        "events_sent": rec.events_sent,
        "events_acked": rec.events_acked,
        "events_due": rec.events_due,
        "ack_latencies": rec.ack.count,
        "negative_latencies": rec.ack.negative + rec.place.negative,
        "place_calls": calls,
        "place_rps": round(calls / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "place_skipped": rec.place_skipped,
        "place_streams": rec.place_streams,
        "directives_received": rec.directives_received,
        "directive_acks_acked": rec.directive_acks_acked,
        "kv_batches_acked": rec.kv_batches_acked,
        "pool_exhausted": rec.pool_exhausted,
        "sessions_finished": rec.sessions_finished,
        "messages_per_s": round(rec.messages_framed / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "events_per_message": round(rec.events_sent / rec.messages_framed, 2)
        if rec.messages_framed
        else 0.0,
        "elapsed_s": round(elapsed_s, 3),
    }
    out.update(extra)
    return out
