"""A short soak (bench/soak.py; `python -m bench soak` runs the long one):
streaming sessions with node processes against a real `serve`, a fault in
every tenth (client drop, node kill -9, node hang), then 10 at once. Every
session ends as it should, no frame is lost, and the engine holds exactly
the fds, threads and shared-memory files it held after warm-up, with its
RSS within 5 %."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from test_serve_cli import ServeProcess

from bench.soak import Soak, served_config

pytestmark = pytest.mark.multiprocess


async def test_short_soak_with_faults_leaves_the_engine_as_it_was(tmp_path):
    root = tempfile.mkdtemp(prefix="rmk", dir="/tmp")
    cfg = tmp_path / "runtime.toml"
    cfg.write_text(served_config(root))
    srv = await ServeProcess.launch(cfg)
    try:
        soak = Soak(srv.address, srv.proc.pid, root)
        result = await soak.run(sequential=60, concurrent=10, sample_every=20, warm_up=10)
        assert result.unexpected == [], result.unexpected
        assert result.lost_frames == 0
        assert all(result.teardown_s[k] for k in ("clean", "client_drop", "node_kill", "node_hang")), \
            "a kind of session did not run"
        warm = result.samples[0]
        growth = result.growth(warm)
        assert {k: v for k, v in growth.items() if k != "rss_pct"} == {
            "fds": 0, "threads": 0, "shm_files": 0, "iox_files": 0}, (growth, result.samples)
        assert growth["rss_pct"] < 5.0, (growth, result.samples)
        srv.proc.terminate()
        assert await srv.wait() == 0
    finally:
        await srv.kill()
        shutil.rmtree(root, ignore_errors=True)
