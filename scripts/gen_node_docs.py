"""Write docs/nodes.md from the built-in node classes' params schemas.

Usage: python scripts/gen_node_docs.py [OUTPUT]
tests/test_node_docs.py renders the page again and fails when it differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "nodes.md"


def generate() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from engine.catalog import default_registry
    from engine.config import RuntimeConfig
    from engine.nodedocs import render

    # built-ins only: no test nodes, plugins or entry points of this machine
    config = RuntimeConfig.load({"nodes": {"entry_points": False}}, env={})
    return render(default_registry(config))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(generate())
    print(f"wrote {out}")
