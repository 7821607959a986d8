"""Reports of a simulator comparison: a terminal table and an HTML page with PNG plots."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

#: (key, header, format, baseline ratio shown?)
COLUMNS = (
    ("task_completions_per_hour", "tasks/h", "{:,.0f}", True),
    ("jct_p50_s", "JCT p50 s", "{:.1f}", False),
    ("jct_p99_s", "JCT p99 s", "{:.1f}", False),
    ("slo_attainment", "step SLO", "{:.1%}", False),
    ("recompute_share", "recompute", "{:.1%}", False),
    ("kv_util", "KV util", "{:.1%}", False),
    ("token_hit_ratio", "hit ratio", "{:.1%}", False),
    ("misses_vs_oracle", "miss/oracle", "{:.2f}x", False),
    ("peak_throughput_tokens_per_s", "peak tok/s", "{:,.0f}", True),
    ("tenant_slowdown_ratio", "tenant max/min", "{:.2f}", False),
)
BASELINE = "vllm-apc"


def _fmt(fmt: str, v: object) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return fmt.format(v)


def print_table(out: dict[str, Any]) -> None:
    """Print the comparison as a rich table (ratios against vllm-apc where it ran)."""
    from rich.console import Console
    from rich.table import Table

    pol = out["policies"]
    base = pol.get(BASELINE)
    t = Table(
        title=f"scenario {out['scenario']} · {out['gpus']} GPUs · "
        f"{out['duration_s']:.0f} s virtual · seed {out['seed']} · "
        f"{out['sessions']} sessions · {out['wall_s']:.1f} s wall"
    )
    t.add_column("policy", style="bold")
    for _, head, _, _ in COLUMNS:
        t.add_column(head, justify="right")
    for name, m in pol.items():
        cells = []
        for key, _, fmt, ratio in COLUMNS:
            cell = _fmt(fmt, m.get(key))
            if ratio and base and name != BASELINE and base.get(key) and m.get(key) is not None:
                cell += f" ({m[key] / base[key]:.2f}x)"
            cells.append(cell)
        t.add_row(name, *cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a pipe or a file: do not wrap the columns
    console.print(t)


def _plots(
    directory: Path, series: dict[str, dict[str, Any]], out: dict[str, Any]
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    dur = float(out["duration_s"])

    def save(fig: object, name: str, title: str) -> None:
        fig.tight_layout()  # type: ignore[attr-defined]
        fig.savefig(directory / name, dpi=110)  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        made.append((name, title))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in series.items():
        t = s["completion_times_s"]
        ax.step(t, range(1, len(t) + 1), where="post", label=name)
    ax.set(
        xlabel="virtual time (s)",
        ylabel="tasks completed",
        xlim=(0, dur),
        title="Task completions over time",
    )
    ax.legend()
    save(fig, "completions.png", "Task completions over time")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in series.items():
        ax.plot(s["util_t_s"], [100 * u for u in s["util"]], label=name)
    ax.set(
        xlabel="virtual time (s)",
        ylabel="live KV / GPU KV capacity (%)",
        ylim=(0, 100),
        xlim=(0, dur),
        title="KV memory utilisation (live sessions)",
    )
    ax.legend()
    save(fig, "kv_util.png", "KV memory utilisation")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in series.items():
        j = s["jct_s"]
        if j:
            ax.plot(j, [(i + 1) / len(j) for i in range(len(j))], label=name)
    ax.set(
        xlabel="job completion time (s)",
        ylabel="CDF",
        ylim=(0, 1),
        title="Job completion time CDF (completed tasks)",
    )
    ax.legend()
    save(fig, "jct_cdf.png", "Job completion time CDF")

    pol = out["policies"]
    tenants = sorted({t for m in pol.values() for t in m.get("tenant_slowdown", {})})
    if tenants:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(pol))
        for k, (name, m) in enumerate(pol.items()):
            vals = [m.get("tenant_slowdown", {}).get(t) or 0.0 for t in tenants]
            ax.bar([i + k * width for i in range(len(tenants))], vals, width, label=name)
        ax.set_xticks([i + width * (len(pol) - 1) / 2 for i in range(len(tenants))], tenants)
        ax.set(ylabel="mean slowdown (JCT / standalone)", title="Per-tenant slowdown")
        ax.legend()
        save(fig, "tenant_slowdown.png", "Per-tenant slowdown")
    return made


def write_html(directory: str, out: dict[str, Any], series: dict[str, dict[str, Any]]) -> Path:
    """Write index.html and its PNG plots into ``directory``; returns the page's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    plots = _plots(d, series, out)
    pol = out["policies"]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in COLUMNS)
    rows = []
    for name, m in pol.items():
        cells = "".join(f"<td>{html.escape(_fmt(f, m.get(k)))}</td>" for k, _, f, _ in COLUMNS)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    imgs = "".join(
        f'<figure><img src="{n}" alt="{html.escape(t)}"><figcaption>'
        f"{html.escape(t)}</figcaption></figure>"
        for n, t in plots
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvsched simulate: {html.escape(out["scenario"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block}}</style>
</head><body>
<h1>Scenario {html.escape(out["scenario"])}</h1>
<p>{out["gpus"]} GPUs, {out["duration_s"]:.0f} s virtual, seed {out["seed"]},
{out["sessions"]} sessions, {out["wall_s"]:.1f} s wall.</p>
<table><tr><th>policy</th>{head}</tr>{"".join(rows)}</table>
{imgs}
</body></html>
"""
    path = d / "index.html"
    path.write_text(page)
    return path
