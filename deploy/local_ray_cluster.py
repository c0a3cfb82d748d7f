"""A real two-node Ray cluster on this machine, made with `ray start`: a head
(2 CPUs, the dashboard for Ray's state API) and a second node that declares
one GPU (`--num-gpus=1`; no GPU is needed), for trying the Ray executor,
its tests (tests/test_ray.py) and its bench (`python -m bench ray_node`).
Its processes are not the caller's children (`ray start` leaves them to
init); `stop()` finds and ends every one of them.

    python deploy/local_ray_cluster.py    # prints the [ray] address; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self) -> None:
        # short: Ray's socket paths live under it
        self.temp_dir = tempfile.mkdtemp(prefix="rmeray", dir="/tmp")
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # every process of the cluster inherits this mark (the agents rename
        # themselves, so their command lines do not tell)
        # their own temporary files (multiprocessing's listener folders) stay in its
        # folder too, so stop() removes them with it
        tmp = os.path.join(self.temp_dir, "tmp")
        os.mkdir(tmp)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RME_TEST_RAY_CLUSTER": self.temp_dir,
                    "TMPDIR": tmp}

    def _ray_start(self, *args: str) -> None:
        subprocess.run([RAY, "start", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
                       env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120, stdin=subprocess.DEVNULL)

    def start(self) -> RayCluster:
        self._ray_start("--head", f"--port={self.port}", "--num-cpus=2", f"--temp-dir={self.temp_dir}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}")
        self.add_gpu_node()
        return self

    def add_gpu_node(self) -> None:
        self._ray_start(f"--address={self.address}", "--num-cpus=2", "--num-gpus=1")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: by the mark in its environment, or (an
        agent that rewrote its title over it) by its log files in the cluster's folder."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.environ().get("RME_TEST_RAY_CLUSTER") == self.temp_dir or any(
                        f.path.startswith(self.temp_dir) for f in p.open_files()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def raylet_of(self, node_id: str) -> psutil.Process:
        for p in self.processes():
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].endswith("/raylet") and f"--node_id={node_id}" in cmd:
                return p
        raise LookupError(f"no raylet of node {node_id}")

    def lose_node(self, node_id: str) -> list[psutil.Process]:
        """The machine of Ray node `node_id` gone at once: kill -9 of its raylet and
        every process under it (its workers, its agents), with no one left to tell.
        Returns at once with the processes signalled (psutil.wait_procs them)."""
        raylet = self.raylet_of(node_id)
        procs = [raylet, *raylet.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        return procs

    def alive_actors(self, class_name: str = "NodeActor") -> list:
        """The cluster's live (or still starting) actors of `class_name`, by Ray's state API."""
        from ray.util.state import list_actors

        return [a for a in list_actors(address=self.dashboard, filters=[("class_name", "=", class_name)],
                                       raise_on_missing_output=False)
                if a.state not in ("DEAD",)]

    def stop(self) -> None:
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=10)
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    cluster = RayCluster().start()
    print(f'[ray]\naddress = "{cluster.address}"\nplace_by_capabilities = true\n'
          f"# dashboard (Ray's state API): {cluster.dashboard}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
