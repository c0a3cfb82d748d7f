"""N engines behind nginx on loopback: for a demo, and for the tests.

    python deploy/local_cluster.py --engines 3 --port 50060 [--config runtime.toml]

starts `remotemedia-engine serve` N times (ports port+1 … port+N) and nginx
on `port` (deploy/nginx.conf.template), prints the addresses, and runs until
Ctrl-C or SIGTERM (then drains every engine). `restart(i)` is a rolling
restart's step: SIGTERM (the engine drains), wait for it to exit, start it
again on its port.

Run by any python: when the engine is not importable by the one running
this script, the project's own venv (.venv, from `make run` or `make test`)
runs it instead. A port in use, a config that cannot be read or an engine
that does not start is one line on stderr and exit 1, with nothing left.
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
            raise RuntimeError(f"engine on {self.address} did not start in {timeout_s:.0f} s: {self._last_words()}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"engine on {self.address} exited: {self._last_words()}")

    def _last_words(self) -> str:
        """What the engine said last (its error line), not its whole log."""
        said = [line.strip() for line in self.lines if line.strip()]
        errors = [line for line in said if line.lower().startswith("error")]
        return (errors or said or ["(nothing)"])[-1]

    def _pump(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)
            if re.search(r"serving remotemedia\.v1 on ", line):
                ready.set()
        ready.set()  # exited: start() reports it

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM: the engine drains (see docs/deployment.md); its exit code."""
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
        self.prefix: Path | None = None
        self.nginx: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        """Every engine, then nginx; on any failure what was started is stopped and the error raised."""
        busy = [p for p in (self.port, *(e.port for e in self.engines)) if _listening(p)]
        if busy:
            raise RuntimeError(f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} already in use "
                               f"(another engine? `make run` takes 50051): choose another --port")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for engine in self.engines:
            engine.start()
        self.prefix = Path(tempfile.mkdtemp(prefix="rme-nginx-"))
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
                err = self.nginx.stderr.read() if self.nginx.poll() is not None and self.nginx.stderr else ""
                raise RuntimeError(f"nginx did not start: {err.strip() or 'not listening after 10 s'}")
            time.sleep(0.02)

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
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_on(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _use_project_venv() -> None:
    """Re-run this script with the project's venv when this python has no engine."""
    try:
        import engine  # noqa: F401
    except ImportError:
        venv = HERE.parent / ".venv" / "bin" / "python"
        if not venv.exists() or Path(sys.prefix).resolve() == venv.parent.parent.resolve():
            raise SystemExit("the engine is not installed for this python: run `make run` (or `make test`) "
                             "once, then .venv/bin/python deploy/local_cluster.py ...") from None
        os.execv(str(venv), [str(venv), *sys.argv])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=3, help="engines behind nginx (default 3)")
    p.add_argument("--port", type=int, default=50060,
                   help="nginx's port; engines take the next N (default 50060: clear of `make run`'s 50051)")
    p.add_argument("--config", help="runtime.toml for every engine (default: the built-in defaults)")
    args = p.parse_args()
    if args.config and not os.access(args.config, os.R_OK):
        example = " (runtime.toml.example is a commented one to copy)" if Path("runtime.toml.example").exists() else ""
        print(f"error: cannot read config {args.config}: no such file{example}", file=sys.stderr)
        return 1
    find_nginx()
    # Ctrl-C and SIGTERM end the wait below; the engines are started with no signal blocked,
    # so each drains on its own SIGTERM (and on the terminal's SIGINT to the process group)
    signal.signal(signal.SIGTERM, _stop_on)
    signal.signal(signal.SIGINT, _stop_on)  # also when started with it ignored (`&` in a script)
    cluster = Cluster(args.engines, args.port, args.config)
    try:
        cluster.start()
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"nginx on {cluster.address} → engines " + ", ".join(e.address for e in cluster.engines)
              + " (Ctrl-C drains them and stops)", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("draining the engines…", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the drain short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    _use_project_venv()
    sys.exit(main())
