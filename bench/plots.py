"""A PNG per scenario result and the Markdown report of all of them.

`plot(result, path)` draws what a result holds: series over load (names
that start with a count, e.g. "20 streams, 20 ms chunks") as p50/p95/p99
lines against that count, the other series as latency (or size)
distributions, one panel per unit. A scenario that draws its own figure
(voice_loop's timeline) says so with `own_plot` and keeps it.
`report(results_dir)` writes one Markdown page with every latest result's
table and image.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_LOAD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s+(\w+)(?:,\s*(.*))?$")
_TIME_SCALES = ((1e-3, "µs", 1e6), (1.0, "ms", 1e3), (math.inf, "s", 1.0))


def _time_scale(values: list[float]) -> tuple[str, float]:
    top = max(values) if values else 0.0
    for limit, unit, factor in _TIME_SCALES:
        if top < limit:
            return unit, factor
    return "s", 1.0


def _load_groups(series: dict[str, Any]) -> dict[str, list[tuple[float, str]]] | None:
    """{"streams, 20 ms chunks": [(10, name), (20, name), ...]} when every series is one load step."""
    groups: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name in series:
        m = _LOAD.match(name)
        if m is None:
            return None
        groups[f"{m.group(2)}" + (f", {m.group(3)}" if m.group(3) else "")].append((float(m.group(1)), name))
    if not any(len(v) > 1 for v in groups.values()):
        return None
    return groups


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Draw `result` into `path` (PNG); None when it has no series to draw."""
    series = {k: v for k, v in result.get("series", {}).items() if v.get("n")}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _load_groups(series)
    if groups is not None and len({s["unit"] for s in series.values()}) == 1:
        fig = _plot_load(plt, result["scenario"], series, groups)
    else:
        fig = _plot_distributions(plt, result["scenario"], series)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_load(plt: Any, title: str, series: dict[str, Any], groups: dict[str, list[tuple[float, str]]]) -> Any:
    unit = next(iter(series.values()))["unit"]
    shown, factor = _time_scale([s["p99"] for s in series.values()]) if unit == "s" else (unit, 1.0)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in groups.items():
        points.sort()
        xs = [x for x, _ in points]
        for q, style in (("p50", "-o"), ("p95", "--s"), ("p99", ":^")):
            ax.plot(xs, [series[n][q] * factor for _, n in points], style, label=f"{label} {q}")
    ax.set_xlabel(" / ".join(sorted({label.split(",")[0] for label in groups})))
    ax.set_ylabel(shown)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_distributions(plt: Any, title: str, series: dict[str, Any]) -> Any:
    by_unit: dict[str, list[str]] = defaultdict(list)
    for name, s in series.items():
        by_unit[s["unit"]].append(name)
    rows = sum(len(names) for names in by_unit.values())
    fig, axes = plt.subplots(len(by_unit), 1, figsize=(9, 0.5 * rows + 1.2 * len(by_unit) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [len(n) for n in by_unit.values()]})
    for ax, (unit, names) in zip(axes[:, 0], by_unit.items(), strict=True):
        shown, factor = _time_scale([series[n]["p99"] for n in names]) if unit == "s" else (unit, 1.0)
        data = [[v * factor for v in series[n]["samples"]] or [series[n]["p50"] * factor] for n in names]
        ax.boxplot(data, orientation="horizontal", whis=(1, 99), showfliers=False, widths=0.6)
        ax.set_yticks(range(1, len(names) + 1), [_short(n) for n in names], fontsize=7)
        ax.invert_yaxis()
        lo = min(min(d) for d in data)
        hi = max(max(d) for d in data)
        if lo > 0 and hi / lo > 100:
            ax.set_xscale("log")
        ax.set_xlabel(f"{shown} (box: p25–p75 and the median, whiskers: p1–p99)")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------- report


def _fmt(v: float, unit: str) -> str:
    if not isinstance(v, (int, float)) or v != v:
        return "—"
    if unit == "s":
        us = v * 1e6
        return f"{us:,.1f} µs" if us < 10_000 else f"{us / 1000:,.2f} ms"
    return f"{v:,.2f} {unit}"


def report(results: Path, out: Path | None = None) -> Path:
    """One Markdown page: per scenario (the latest JSON of each) its table and its PNG."""
    out = out or results / "REPORT.md"
    lines = ["# Benchmark results", "",
             "Written by `python -m bench report` from the latest result of each scenario in "
             "this folder (`python -m bench SCENARIO` rewrites one). Times are p50/p95/p99 of n runs.", ""]
    found = sorted(results.glob("*.json"))
    lines += [f"- [{p.stem}](#{p.stem})" for p in found] + [""]
    for path in found:
        r = json.loads(path.read_text())
        env = r.get("environment", {})
        lines += [f"## {r['scenario']}", "",
                  f"`{r.get('command', '')}` — {env.get('time', '?')}, Python {env.get('python', '?')}, "
                  f"{env.get('cpu_count', '?')} CPUs, {r.get('duration_s', 0):.0f} s", ""]
        if r.get("notes"):
            lines += [r["notes"].strip(), ""]
        if r.get("series"):
            lines += ["| series | n | p50 | p95 | p99 |", "|---|---:|---:|---:|---:|"]
            for name, s in r["series"].items():
                lines.append(f"| {name.strip()} | {s['n']} | {_fmt(s['p50'], s['unit'])} | "
                             f"{_fmt(s['p95'], s['unit'])} | {_fmt(s['p99'], s['unit'])} |")
            lines.append("")
        rows = [(k, v) for k, v in r.get("derived", {}).items()] + \
            [(f"target: {k}", v) for k, v in r.get("targets", {}).items()]
        if rows:
            lines += ["| derived | value |", "|---|---|"]
            lines += [f"| {k} | {round(v, 3) if isinstance(v, float) else v} |" for k, v in rows]
            lines.append("")
        png = path.with_suffix(".png")
        if png.exists():
            lines += [f"![{r['scenario']}]({png.name})", ""]
    out.write_text("\n".join(lines))
    return out


__all__ = ["plot", "report"]
