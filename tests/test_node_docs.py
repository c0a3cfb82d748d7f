"""docs/nodes.md is what the params schemas say, and every built-in param says what it means."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from engine.catalog import default_registry
from engine.config import RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_node_docs", ROOT / "scripts" / "gen_node_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_nodes_md_is_current():
    assert (ROOT / "docs" / "nodes.md").read_text() == _generator().generate(), \
        "docs/nodes.md is out of date: run `python scripts/gen_node_docs.py` (or `make docs`)"


def test_every_built_in_param_has_a_meaning():
    registry = default_registry(RuntimeConfig.load({"nodes": {"entry_points": False}}, env={}))
    missing = [f"{spec.node_type}.{name}" for spec in registry.specs()
               for name, prop in (spec.cls.params_schema or {}).get("properties", {}).items()
               if not prop.get("description")]
    assert missing == []


def test_nodes_markdown_from_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "engine", "nodes", "--markdown"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr
    assert "## WhisperNode" in res.stdout and "| `beam_size`<br>`beamSize` |" in res.stdout
