"""llama.cpp's OpenAI-compatible HTTP server on a local GGUF, in a process of its own.

xllamacpp embeds llama.cpp's server (the one `llama-server` runs): an
`xllamacpp.Server` listens on 127.0.0.1 and answers `/v1/chat/completions`
(streamed), `/v1/models`, `/metrics` and the rest while it lives. So an
OpenAIChatNode can be tried, tested and measured with nothing but the
bundled model:

    python -m nodes.speech.llama_server --port 8081      # SmolLM2; Ctrl-C stops it
    # then OpenAIChatNode with base_url = http://127.0.0.1:8081/v1 (as it prints)

`LocalLlamaServer` runs it from Python (the tests, the bench): on a port the
server picks itself (no race for a free one), its address read from the
child's first line of output; closed by closing the child's stdin, then
SIGTERM, then SIGKILL, each with a deadline. The child also exits when its
parent dies (stdin EOF, and PR_SET_PDEATHSIG), so nothing outlives a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

PR_SET_PDEATHSIG = 1


class LocalLlamaServer:
    """A llama.cpp server child process; `base_url` is its OpenAI API root once started."""

    def __init__(self, model_path: str = "", threads: int = 1, context_size: int = 2048,
                 api_key: str = "") -> None:
        self.model_path = model_path
        self.api_key = api_key
        self.threads = threads
        self.context_size = context_size
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server and wait until it answers (model loaded); returns its URL."""
        args = [sys.executable, "-m", __name__, "--port", "0", "--watch-stdin",
                "--threads", str(self.threads), "--context-size", str(self.context_size)]
        if self.model_path:
            args += ["--model", self.model_path]
        env = dict(os.environ)
        if self.api_key:  # through the environment: a command line is visible to every user
            args += ["--api-key-env", "LLAMA_SERVER_API_KEY"]
            env["LLAMA_SERVER_API_KEY"] = self.api_key
        self._log = tempfile.TemporaryFile()  # llama.cpp's own output, shown if it fails to start
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=env)
        try:
            self.url = self._address(timeout_s)
        except BaseException:
            self.close()
            raise
        return self.url

    def _address(self, timeout_s: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            line = b""
            while not line.endswith(b"\n"):
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"the llama.cpp server did not start within {timeout_s:.0f} s{self._tail()}")
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"the llama.cpp server exited with {self._proc.wait()}{self._tail()}")
                line += chunk
        return str(json.loads(line.splitlines()[-1])["url"])

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return ": " + self._log.read()[-2000:].decode(errors="replace").strip()

    def kill(self) -> None:
        """SIGKILL, as a crash would (the tests' server going away mid-reply)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child: stdin EOF (its cue), then SIGTERM, then SIGKILL, each given `timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # it died already: nothing reads the pipe
                    proc.stdin.close()
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None:
                    stop()
                try:
                    proc.wait(timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalLlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- the child


def _bundled_model() -> str:
    from .models import smollm2_path

    return str(smollm2_path("llama_server"))


def serve(model: str, host: str, port: int, threads: int, context_size: int, api_key: str = "") -> Any:
    """An xllamacpp.Server on `host:port` (0 = any free port) with `model` loaded; with
    `api_key`, requests must carry it as their bearer token."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = model
    p.hostnames = [host]
    p.port = port
    p.n_ctx = context_size
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.endpoint_metrics = True  # /metrics: what the tests read to see a request stop
    p.offline = True  # never download anything
    p.verbosity = -1
    if api_key:
        p.api_keys = [api_key]
    return xlc.Server(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodes.speech.llama_server",
                                 description="llama.cpp's OpenAI-compatible server on a local GGUF")
    ap.add_argument("--model", default="", help="a GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 = any free port")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context-size", type=int, default=2048)
    ap.add_argument("--api-key-env", default="", help="the environment variable holding the key requests must carry")
    ap.add_argument("--watch-stdin", action="store_true",
                    help="exit at stdin EOF and when the parent dies (how LocalLlamaServer runs it)")
    a = ap.parse_args(argv)
    stop = threading.Event()
    if a.watch_stdin:
        # the parent's death ends us even if it never closes our stdin
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if a.api_key_env and not os.environ.get(a.api_key_env):
        ap.error(f"--api-key-env: {a.api_key_env} is not set")
    server = serve(a.model or _bundled_model(), a.host, a.port, a.threads, a.context_size,
                   os.environ.get(a.api_key_env, "") if a.api_key_env else "")
    print(json.dumps({"url": server.listening_address, "base_url": f"{server.listening_address}/v1"}), flush=True)
    if a.watch_stdin:
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), stop.set()), daemon=True).start()
    stop.wait()
    # llama.cpp's server threads end with the process; nothing is left to flush
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
