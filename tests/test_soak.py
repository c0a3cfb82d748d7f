"""A short soak (bench/soak.py; `python -m bench soak` runs the long one):
streaming sessions with node processes against a real `serve`, a fault in
every tenth (client drop, node kill -9, node hang), then 10 at once. Every
session ends as it should, no frame is lost; over the sequential sessions
the engine keeps exactly its fds, threads and shared-memory files, RSS
within 5 %, and after the burst exactly what it had after warm-up."""

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
        warm, seq, end = result.samples[0], result.samples[1:-1], result.samples[-1]
        # sequential sessions: exactly the same engine every 20 sessions, RSS within 5 %
        for s in seq[1:]:
            assert (s.fds, s.threads, s.shm_files, s.iox_files) == (
                seq[0].fds, seq[0].threads, seq[0].shm_files, seq[0].iox_files), result.samples
        assert seq[-1].rss_mib < seq[0].rss_mib * 1.05, result.samples
        # after the concurrent burst: exactly the engine of after warm-up (its executor's
        # threads were all started with the server)
        assert (end.fds, end.threads, end.shm_files, end.iox_files) == (
            warm.fds, warm.threads, warm.shm_files, warm.iox_files), result.samples
        srv.proc.terminate()
        assert await srv.wait() == 0
    finally:
        await srv.kill()
        shutil.rmtree(root, ignore_errors=True)
