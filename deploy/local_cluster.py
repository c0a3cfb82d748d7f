"""N engines behind nginx on loopback: for a demo, and for the tests.

    python deploy/local_cluster.py --engines 3 --port 50050 [--config runtime.toml]

starts `remotemedia-engine serve` N times (ports port+1 … port+N) and nginx
on `port` (deploy/nginx.conf.template), prints the addresses, and runs until
Ctrl-C (then drains every engine). `restart(i)` is a rolling restart's step:
SIGTERM (the engine drains), wait for it to exit, start it again on its port.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "nginx.conf.template"


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        raise SystemExit("nginx not found: apt-get install nginx-light (or nginx)")
    return found


class Engine:
    """One `remotemedia-engine serve` process on a fixed loopback port."""

    def __init__(self, port: int, config: str | None, env: dict[str, str] | None) -> None:
        self.port = port
        self.config = config
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.config:
            cmd += ["--config", self.config]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     env=self.env)
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"engine on {self.address} did not start: {''.join(self.lines)}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"engine on {self.address} exited: {''.join(self.lines)}")

    def _pump(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)
            if re.search(r"serving remotemedia\.v1 on ", line):
                ready.set()
        ready.set()  # exited: start() reports it

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM: the engine drains (see README "Many engines"); its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Cluster:
    def __init__(self, engines: int, port: int, config: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port
        self.engines = [Engine(port + 1 + i, config, env) for i in range(engines)]
        self.prefix = Path(tempfile.mkdtemp(prefix="rme-nginx-"))
        self.nginx: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        for engine in self.engines:
            engine.start()
        upstreams = "\n".join(f"        server {e.address} max_fails=0;" for e in self.engines)
        conf = (TEMPLATE.read_text().replace("$UPSTREAMS", upstreams)
                .replace("$LISTEN", self.address).replace("$PREFIX", str(self.prefix)))
        (self.prefix / "nginx.conf").write_text(conf)
        self.nginx = subprocess.Popen([find_nginx(), "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                                       "-e", str(self.prefix / "error.log")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.nginx.poll() is not None or time.monotonic() > deadline:
                err = self.nginx.stderr.read() if self.nginx.stderr else ""
                self.stop()
                raise RuntimeError(f"nginx did not start: {err}")
            time.sleep(0.02)
        return self

    def restart(self, i: int) -> int:
        """One step of a rolling restart: drain engine i, start it again; its exit code."""
        code = self.engines[i].stop()
        self.engines[i].start()
        return code

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=3, help="engines behind nginx (default 3)")
    p.add_argument("--port", type=int, default=50050, help="nginx's port; engines take the next N (default 50050)")
    p.add_argument("--config", help="runtime.toml for every engine")
    args = p.parse_args()
    with Cluster(args.engines, args.port, args.config) as cluster:
        print(f"nginx on {cluster.address} → engines " + ", ".join(e.address for e in cluster.engines), flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
