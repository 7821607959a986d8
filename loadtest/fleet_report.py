"""`kvsched loadtest --report DIR`: an HTML page with PNG plots of one run."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

_HEADLINE = (
    ("events_per_s", "events/s acked", "{:,.0f}"),
    ("ack_p50_ms", "ack p50 ms", "{:.2f}"),
    ("ack_p99_ms", "ack p99 ms", "{:.2f}"),
    ("ack_p999_ms", "ack p99.9 ms", "{:.2f}"),
    ("place_p50_ms", "Place p50 ms", "{:.2f}"),
    ("place_p99_ms", "Place p99 ms", "{:.2f}"),
    ("place_rps", "Place calls/s", "{:,.0f}"),
    ("place_fallback_rate", "Place fallback rate", "{:.1%}"),
    ("directives_applied", "directives applied", "{:,}"),
    ("server_rss_bytes", "server RSS bytes", "{:,}"),
    ("server_cpu_share", "server CPU (cores)", "{:.2f}"),
    ("client_cpu_share", "load generator CPU (cores)", "{:.2f}"),
    ("knee_events_per_s", "ramp knee events/s", "{:,.0f}"),
    ("echo_events_per_s", "grpcio echo events/s", "{:,.0f}"),
    ("kvsched_raw_events_per_s", "kvsched raw-client events/s", "{:,.0f}"),
    ("kvsched_vs_echo", "kvsched / echo", "{:.1%}"),
)


def _plots(out: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = out.get("series") or {}
    names: list[str] = []
    ack = series.get("ack") or []
    place = series.get("place") or []
    if ack or place:
        fig, ax = plt.subplots(figsize=(8, 4))
        for label, pts in (("ack", ack), ("Place", place)):
            if pts:
                t = [p["t_s"] for p in pts]
                ax.plot(t, [p["p50_ms"] for p in pts], ".-", label=f"{label} p50")
                ax.plot(t, [p["p99_ms"] for p in pts], ".-", label=f"{label} p99")
        ax.set_yscale("log")
        ax.set_xlabel("time into the run (s)")
        ax.set_ylabel("latency from intended send time (ms)")
        ax.set_title("Latency over time (per second)")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "latency_over_time.png", dpi=100)
        plt.close(fig)
        names.append("latency_over_time.png")
    if ack:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([p["t_s"] for p in ack], [p["n"] for p in ack], ".-", label="events acked/s")
        ax.axhline(out.get("offered_events_per_s", 0.0), color="grey", ls="--", label="offered")
        ax.set_xlabel("time into the run (s)")
        ax.set_ylabel("events/s")
        ax.set_title("Throughput over time")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "throughput_over_time.png", dpi=100)
        plt.close(fig)
        names.append("throughput_over_time.png")
    cdfs = [(n, series.get(k) or []) for n, k in (("ack", "ack_cdf"), ("Place", "place_cdf"))]
    if any(pts for _, pts in cdfs):
        fig, ax = plt.subplots(figsize=(8, 4))
        for label, pts in cdfs:
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of calls <= latency")
        ax.set_title("Latency CDF (whole run)")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "latency_cdf.png", dpi=100)
        plt.close(fig)
        names.append("latency_cdf.png")
    steps = out.get("ramp_steps") or []
    if steps:
        fig, ax = plt.subplots(figsize=(8, 4))
        offered = [s["offered_events_per_s"] for s in steps]
        ax.plot(offered, [s["ack_p99_ms"] for s in steps], "o-", label="ack p99")
        ax.plot(offered, [s["ack_p50_ms"] for s in steps], "o-", label="ack p50")
        ax.axhline(out.get("ramp_p99_ms", 10.0), color="grey", ls="--", label="threshold")
        ax.set_yscale("log")
        ax.set_xlabel("offered events/s")
        ax.set_ylabel("ms")
        ax.set_title("Ramp: ack latency vs offered load")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "ramp.png", dpi=100)
        plt.close(fig)
        names.append("ramp.png")
    return names


def write_report(out: dict[str, Any], folder: Path) -> Path:
    """Writes index.html, result.json and the PNG plots into `folder`; returns the page."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = _plots(out, folder)
    (folder / "result.json").write_text(json.dumps(out, indent=1))
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(fmt.format(out[key]))}</td></tr>"
        for key, label, fmt in _HEADLINE
        if key in out
    )
    errors = html.escape(json.dumps(out.get("errors", {})))
    imgs = "".join(f'<p><img src="{html.escape(n)}" alt="{html.escape(n)}"></p>' for n in pngs)
    page = (
        "<!doctype html><meta charset=utf-8><title>kvsched load test</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "th{text-align:left;padding-right:2em}</style>"
        f"<h1>kvsched load test</h1><p><code>{html.escape(str(out.get('command', '')))}</code>"
        f"<br>{html.escape(str(out.get('date_utc', '')))} UTC · "
        f"{html.escape(str(out.get('machine', '')))}</p>"
        f"<table>{rows}</table><p>errors by code: <code>{errors}</code></p>{imgs}"
    )
    path = folder / "index.html"
    path.write_text(page)
    return path
