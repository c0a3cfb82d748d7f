"""Scenario registry, statistics and result files.

A scenario is a function returning a dict of named series (lists of seconds
or plain numbers) plus free-form notes; the harness turns each series into
p50/p95/p99 and writes one JSON file per run under bench/out/ (not
committed), with a PNG of it beside (bench.plots). `--reference` writes to
bench/results/ instead: the reference runs the docs quote, committed on
purpose.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import plots

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # the reference results, committed (`--reference`)
OUT = HERE / "out"  # every other run's (ignored by git)
#: where this run writes (run() sets it; a scenario drawing its own figure writes there too)
folder = OUT
SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {}


def scenario(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        SCENARIOS[name] = fn
        return fn
    return deco


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def round_trips(session: Any, node_id: str, frame: Any, n: int, warm: int = 100) -> list[float]:
    """Seconds from sending `frame` to `node_id` of an open streaming session to
    its first output, `n` times (after `warm` unmeasured ones); each is awaited
    before the next is sent."""
    out = []
    outputs = session.__aiter__()
    for i in range(n + warm):
        t = time.perf_counter()
        await session.send(node_id, frame)
        await outputs.__anext__()
        if i >= warm:
            out.append(time.perf_counter() - t)
    return out


def summarize(values: list[float], unit: str) -> dict[str, Any]:
    return {
        "unit": unit,
        "n": len(values),
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "mean": statistics.fmean(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "samples": values if len(values) <= 5000 else values[:: max(1, len(values) // 5000)],
    }


def environment() -> dict[str, Any]:
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = []
    import numpy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "numpy": numpy.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(names: list[str], argv: list[str], reference: bool = False) -> list[dict[str, Any]]:
    global folder
    folder = RESULTS if reference else OUT
    folder.mkdir(exist_ok=True)
    out = []
    for name in names:
        t0 = time.perf_counter()
        data = SCENARIOS[name]()
        series = {k: summarize(v["values"], v["unit"]) for k, v in data.get("series", {}).items()}
        result = {
            "scenario": name,
            "command": "python -m bench " + " ".join(argv),
            "environment": environment(),
            "duration_s": time.perf_counter() - t0,
            "series": series,
            "derived": data.get("derived", {}),
            "targets": data.get("targets", {}),
            "notes": data.get("notes", ""),
        }
        path = folder / f"{name}.json"
        path.write_text(json.dumps(result, indent=1))
        out.append(result)
        print_table(result)
        written = [path]
        if not data.get("own_plot"):  # a scenario that draws its own figure has written it
            png = plots.plot(result, path.with_suffix(".png"))
            if png is not None:
                written.append(png)
        for p in written:
            print(f"  → {p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p}")
        print()
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        us = v * 1e6
        return f"{us:,.1f} µs" if us < 10_000 else f"{us / 1000:,.2f} ms"
    return f"{v:,.2f} {unit}"


def print_table(result: dict[str, Any]) -> None:
    print(f"== {result['scenario']} ({result['duration_s']:.1f} s)")
    if result["series"]:
        print(f"  {'series':<44} {'n':>6} {'p50':>12} {'p95':>12} {'p99':>12}")
        for k, s in result["series"].items():
            print(f"  {k:<44} {s['n']:>6} {_fmt(s['p50'], s['unit']):>12} "
                  f"{_fmt(s['p95'], s['unit']):>12} {_fmt(s['p99'], s['unit']):>12}")
    for k, v in result["derived"].items():
        print(f"  {k:<44} {v if not isinstance(v, float) else round(v, 3)}")
    for k, v in result["targets"].items():
        print(f"  target {k:<37} {v}")
