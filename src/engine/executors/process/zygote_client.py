"""The engine's side of the zygote (see engine.zygote): starting it, asking
it for processes, hearing which of them exited, and hearing that it died
(its socket ends: `on_gone`; the process manager restarts it)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ...config import RuntimeConfig
from ...errors import InternalError
from ...ipc import zygote_protocol as zp
from ...ipc.endpoints import EngineSpace, ProcessArgs

#: thread-pool sizes of numerical libraries, set to 1 for node processes unless already set
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: exit statuses kept for processes nobody asked about yet
_KEEP_EXITS = 4096


def app_import_path() -> list[str]:
    """The embedding app's own import path: the entries of sys.path a fresh
    interpreter would not have (its folder, PYTHONPATH, what it inserted),
    so node processes import the app's node modules as the app does."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if any(path == p or path.startswith(p + os.sep) for p in prefixes) or path in out:
            continue
        if os.path.isdir(path):
            out.append(path)
    return out


def node_process_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    # One BLAS/OpenMP thread per node process unless the operator says
    # otherwise (as Ray does for its workers): the pools these libraries
    # size to every core spin after each call, and beside the other
    # nodes' processes that is CPU taken from them. A node sets its own
    # model's threads through its params (explicit counts win).
    for var in THREAD_VARS:
        env.setdefault(var, "1")
    paths = app_import_path()
    if env.get("PYTHONPATH"):
        paths += [p for p in env["PYTHONPATH"].split(os.pathsep) if p and p not in paths]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class ZygoteGone(InternalError):
    """The zygote died before answering a request (the process manager starts a new one)."""


class ZygoteClient:
    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        #: pids of node processes not yet reported exited
        self.live: set[int] = set()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reqs = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._exits: dict[int, int] = {}
        self._exit_waiters: dict[int, list[asyncio.Future]] = {}
        #: processes of a zygote that died (killed with it: its children's
        #: parent-death signal); nobody will report their exit
        self._lost: dict[int, None] = {}
        self._pong: asyncio.Future | None = None
        #: called on the loop when the zygote is found dead (not after aclose)
        self.on_gone: Callable[[], None] | None = None
        #: zygote processes that died, still to be reaped
        self._dead: list[subprocess.Popen] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def started(self) -> bool:
        """A zygote runs (started and not found dead)."""
        return self._proc is not None

    def start(self, space: EngineSpace, modules: list[str]) -> None:
        """Start the zygote (from the loop thread: the zygote's parent-death
        signal fires when the *thread* that started it ends)."""
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(  # noqa: ASYNC220
            [self.config.python_executable, "-m", "engine.zygote", str(theirs.fileno()),
             space.root, space.prefix, str(space.inbox_slots), str(self.config.standby_processes), *modules],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=node_process_env(),
            cwd="/", start_new_session=True,
        )
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._loop.add_reader(ours.fileno(), self._readable)
        req = next(self._reqs)
        self._pong = self._loop.create_future()
        self._pending[req] = self._pong
        ours.send(zp.dumps(zp.Ping(req)))

    async def ready(self, timeout_s: float) -> None:
        """Return once the zygote answers (preloaded, forking); a typed error if it does not in time."""
        assert self._pong is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._pong), timeout_s)
        except TimeoutError:
            raise InternalError(f"the node-process zygote did not start within spawn_timeout_secs={timeout_s:g}s",
                                context={"field": "spawn_timeout_secs"}) from None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            msg = zp.loads(data)
            if isinstance(msg, zp.Pong):
                fut = self._pending.pop(msg.req, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(msg, zp.Spawned):
                fut = self._pending.pop(msg.req, None)
                if fut is not None and not fut.done():
                    fut.set_result((msg.pid, msg.inbox))
            elif isinstance(msg, zp.Refused):
                fut = self._pending.pop(msg.req, None) if msg.req is not None else None
                if fut is not None and not fut.done():
                    fut.set_exception(InternalError(f"zygote refused: {msg.message}"))
            elif isinstance(msg, zp.Exited):
                self._exits[msg.pid] = msg.status
                self.live.discard(msg.pid)
                for fut in self._exit_waiters.pop(msg.pid, []):
                    if not fut.done():
                        fut.set_result(msg.status)
                if len(self._exits) > _KEEP_EXITS:
                    self._exits.pop(next(iter(self._exits)))

    def _gone(self) -> None:
        """The zygote died: fail what waits on it; its children died with it."""
        if self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ZygoteGone("the node-process zygote exited"))
        self._pending.clear()
        for pid in self.live:
            self._lost[pid] = None
        self.live.clear()
        while len(self._lost) > _KEEP_EXITS:
            self._lost.pop(next(iter(self._lost)))
        for waiters in self._exit_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._exit_waiters.clear()
        if self._proc is not None:
            self._dead.append(self._proc)
            self._proc = None
        if self.on_gone is not None:
            self.on_gone()

    async def reap_dead(self) -> list[int | None]:
        """Reap zygotes that died (their exit codes)."""
        codes = []
        while self._dead:
            proc = self._dead.pop()
            try:
                codes.append(await asyncio.to_thread(proc.wait, 5))
            except subprocess.TimeoutExpired:  # its socket ended but it lives on: end it
                proc.kill()
                codes.append(await asyncio.to_thread(proc.wait))
        return codes

    async def spawn(self, args: ProcessArgs, child_sock: socket.socket, timeout_s: float) -> tuple[int, str | None]:
        """A node process: (its pid, its inbox's name if already made)."""
        if self._sock is None or self._loop is None:
            raise ZygoteGone("the node-process zygote exited")
        req = next(self._reqs)
        fut = self._loop.create_future()
        self._pending[req] = fut
        try:
            socket.send_fds(self._sock, [zp.dumps(zp.Spawn(req, args))], [child_sock.fileno()])
        except OSError:  # it died; its socket's end was still to be read
            self._gone()
            raise ZygoteGone("the node-process zygote exited") from None
        try:
            pid, inbox = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except (asyncio.CancelledError, TimeoutError):
            # the zygote forks anyway: kill that process as soon as its pid is known
            fut.add_done_callback(self._kill_abandoned)
            raise
        self.live.add(pid)
        return pid, inbox

    def _kill_abandoned(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        pid, _inbox = fut.result()
        if pid in self._exits:
            return
        self.live.add(pid)  # until the zygote reports its exit
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def exit_status(self, pid: int, wait_s: float) -> int | None:
        """The wait status of `pid` once the zygote reaped it (None if not within `wait_s`)."""
        if pid in self._exits:
            return self._exits[pid]
        if pid in self._lost or self._proc is None:
            return None
        assert self._loop is not None
        fut = self._loop.create_future()
        self._exit_waiters.setdefault(pid, []).append(fut)
        try:
            return await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            return None

    async def aclose(self) -> None:
        """Close the socket (the zygote kills every child left and exits) and wait for it."""
        self.on_gone = None
        await self.reap_dead()
        if self._sock is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._sock.fileno())
                except (ValueError, RuntimeError):
                    pass
            self._sock.close()
            self._sock = None
        proc: Any = self._proc
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            self._proc = None
