"""`make run` installs what serving needs and no more; `make test` the rest (dry runs of a fresh
clone's make: the stamps the targets would build are taken as missing)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _extras(target: str, tmp_path: Path) -> set[str]:
    # a venv folder that does not exist: make plans every install step, as on a fresh clone
    dry = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {x for group in re.findall(r"pip install -q -e '\.\[([^\]]*)\]'", dry) for x in group.split(",")}


def test_make_run_installs_what_serving_needs(tmp_path):
    assert _extras("run", tmp_path) == {"speech", "web"}


def test_make_test_installs_the_rest(tmp_path):
    assert {"dev", "speech", "web", "ray", "otel", "bench"} <= _extras("test", tmp_path)
