"""`soak`: 1,000 sequential streaming sessions through two node processes,
then 50 at once, a fault in every tenth (client drop, node kill -9, node
hang), against a `serve` process; the engine's RSS, fds, threads, /dev/shm
and iceoryx2 files sampled after warm-up, every 100 sessions and at the end.
Targets (the reliability issue): RSS growth < 5 %, no growth of the rest,
every session torn down within its own work + 1 s.
"""

from __future__ import annotations

import asyncio
import dataclasses

from bench.harness import scenario
from bench.scenarios_server import IPC_ROOT, served
from bench.soak import Soak


@scenario("soak")
def soak() -> dict:
    with served() as srv:
        result = asyncio.run(Soak(srv.address, srv.pid, IPC_ROOT).run(
            sequential=1000, concurrent=50, sample_every=100, warm_up=20))
    growth = result.growth(result.samples[0])
    seq = result.samples[1:-1]  # every 100 sequential sessions: no burst in between
    seq_growth = {"rss_pct": 100 * (seq[-1].rss_mib - seq[0].rss_mib) / seq[0].rss_mib,
                  "fds": seq[-1].fds - seq[0].fds, "threads": seq[-1].threads - seq[0].threads,
                  "shm_files": seq[-1].shm_files - seq[0].shm_files,
                  "iox_files": seq[-1].iox_files - seq[0].iox_files}
    worst = {k: max(v) if v else None for k, v in result.teardown_s.items()}
    return {
        "series": {f"teardown {k} (beyond own work)": {"values": v, "unit": "s"}
                   for k, v in result.teardown_s.items()},
        "derived": {
            "sessions": result.sessions,
            "lost frames": result.lost_frames,
            "unexpected endings": len(result.unexpected),
            "samples (sessions, rss MiB, fds, threads, shm files, iox files)":
                [list(dataclasses.astuple(s)) for s in result.samples],
            "growth after warm-up (its burst) to the end (after the concurrent phase)": growth,
            "growth from session 100 to 1000 (sequential)": seq_growth,
            "worst teardown s": worst,
            "unexpected (first 5)": result.unexpected[:5],
        },
        "targets": {
            "rss growth < 5 %": growth["rss_pct"] < 5.0 and seq_growth["rss_pct"] < 5.0,
            "fds, threads, shm, iox growth 0": all(growth[k] == 0 for k in ("fds", "threads", "shm_files", "iox_files")),
            "teardown <= own work + 1 s": all(w is None or w <= 1.0 for w in worst.values()),
        },
        "notes": "concurrent phase: faults are client drops and node hangs (a node kill -9 there would hit "
                 "whichever session owns the process it picks). Threads after a burst can differ by the "
                 "loop's default executor filling up to its bound (min(32, cpus + 4)); the sequential "
                 "phase compares like with like.",
    }
