"""Every bench scenario writes a PNG next to its JSON; `bench report` makes one Markdown page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ sits beside src/ and tests/

from bench import harness, plots  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "reference")
    monkeypatch.setattr(harness, "OUT", tmp_path)
    return tmp_path


def test_a_run_leaves_the_committed_reference_results_alone_unless_asked(results, monkeypatch):
    monkeypatch.setattr(harness, "SCENARIOS", {"x": lambda: {"series": {"x": {"values": [1.0], "unit": "s"}}}})
    harness.run(["x"], ["x"])
    assert (results / "x.json").exists() and not harness.RESULTS.exists()
    harness.run(["x"], ["--reference", "x"], reference=True)
    assert (harness.RESULTS / "x.json").exists()


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_scenario_writes_its_plot_beside_its_json_and_the_report_has_both(results, monkeypatch):
    def latency():
        return {"series": {"a round trip": {"values": [0.001 * (1 + i % 7) for i in range(200)], "unit": "s"},
                           "PSS per process": {"values": [12.5, 13.0, 12.8], "unit": "MiB"}},
                "derived": {"ratio": 0.5}}

    def load():
        return {"series": {f"{n} streams, 20 ms chunks": {"values": [0.001 * n] * 50, "unit": "s"}
                           for n in (10, 20, 30)}}

    def own():
        (results / "own.png").write_bytes(b"drawn by the scenario")
        return {"own_plot": True, "series": {"x": {"values": [1.0], "unit": "s"}}}

    monkeypatch.setattr(harness, "SCENARIOS", {"latency": latency, "load": load, "own": own})
    harness.run(["latency", "load", "own"], ["latency", "load", "own"])
    for name in ("latency", "load"):
        assert (results / f"{name}.json").exists() and _png(results / f"{name}.png")
    assert (results / "own.png").read_bytes() == b"drawn by the scenario"
    page = plots.report(results).read_text()
    assert page.startswith("# Benchmark results")
    for name in ("latency", "load", "own"):
        assert f"## {name}" in page and f"![{name}]({name}.png)" in page
    assert "| a round trip | 200 |" in page and "| ratio | 0.5 |" in page
    assert "| 10 streams, 20 ms chunks | 50 | 10.0 ms" not in page  # 10 ms shows as 10.00 ms
    assert "| 10 streams, 20 ms chunks | 50 | 10.00 ms | 10.00 ms | 10.00 ms |" in page


def test_bench_plot_and_report_from_saved_results_from_any_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "engine", "bench", "list"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60)
    assert res.returncode == 0 and "report" in res.stdout
    # every saved result has its figure (voice_loop draws its own timeline)
    for path in (ROOT / "bench" / "results").glob("*.json"):
        assert _png(path.with_suffix(".png")), f"{path.name} has no plot: run python -m bench plot"
