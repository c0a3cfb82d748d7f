"""Multiprocess executor: each node in its own process, frames over iceoryx2.

`ProcessManager` (one per engine) owns the zygote, the engine's iceoryx2
node and space, the service-wide process count and the pool of prewarmed
processes. `NodeProcess` is one forked process with the engine's ends of
its channels. `ProcessRunner` supervises the process of one node of one
session: launch (or take a prewarmed one) → hello (spawn timeout) → assign →
progress … ready (init timeout) → supervise → graceful close → SIGTERM →
SIGKILL of the process group. The engine learns of a death at once through
a pidfd watched by the loop, not by polling.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import psutil

from ..config import RuntimeConfig
from ..errors import (
    EngineError,
    ErrorType,
    InternalError,
    NodeExecutionError,
    ResourceLimitError,
    TypeValidationError,
)
from ..ipc import codec, iox
from ..ipc.channel import EOS, ChannelClosed, FrameReceiver, FrameSender, Inbox
from ..ipc.control import (
    Assign,
    AsyncChannel,
    ChannelsReady,
    DeliverTurnEvent,
    Failure,
    Hello,
    OutputsReady,
    Ping,
    Pong,
    Progress,
    Ready,
    Shutdown,
    ShutdownAck,
    Stats,
)
from ..plan import PlannedNode
from ..registry import ExecutorRegistry
from ..turns import TurnEvent
from ..worker import EngineSpace, ProcessArgs
from .base import NodeRunner, NodeStats
from .base import Progress as ProgressFn

log = logging.getLogger("engine.multiprocess")

#: thread-pool sizes of numerical libraries, set to 1 for node processes unless already set
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_ERROR_CLASSES = {ErrorType.TYPE_VALIDATION.name: TypeValidationError,
                  ErrorType.RESOURCE_LIMIT.name: ResourceLimitError,
                  ErrorType.INTERNAL.name: InternalError}


def describe_status(status: int | None) -> str:
    if status is None:
        return "exited (status unknown)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def process_memory(pids: list[int]) -> int:
    """Bytes charged to these processes: PSS, else USS, else RSS."""
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            try:
                mi = p.memory_full_info()
                total += getattr(mi, "pss", 0) or getattr(mi, "uss", 0) or mi.rss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


_PAGE = os.sysconf("SC_PAGE_SIZE")
#: take PSS for the peak-memory metric every this many memory samples
_PSS_EVERY = 10


def resident_bytes(pids: list[int]) -> int:
    """RSS of these processes from /proc/<pid>/statm (an upper bound of their PSS)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class ProcessManager:
    def __init__(self, config: RuntimeConfig, registry: ExecutorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.space: iox.IpcSpace | None = None
        self.ionode: Any = None
        self._zygote: subprocess.Popen | None = None
        self._zsock: socket.socket | None = None
        self._reqs = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._exits: dict[int, int] = {}
        self._exit_waiters: dict[int, list[asyncio.Future]] = {}
        self._start_lock = asyncio.Lock()
        self.live: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: Inbox | None = None  # the engine's one inbox for all its node processes
        self._inbox_objs: list[Any] = []
        self._slots: dict[int, NodeProcess] = {}  # inbox slot → process
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._pool: list[NodeProcess] = []  # prewarmed, never assigned
        self._filling: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()
        self._pool_failures = 0
        self._closing = False

    # ------------------------------------------------------------ zygote

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if self._zygote is not None:
                if self._zygote.poll() is None:
                    return
                raise InternalError("the node-process zygote died; restart the engine")
            self._loop = asyncio.get_running_loop()
            removed = await asyncio.to_thread(iox.sweep_stale, self.config.ipc_root)
            if removed:
                log.info("removed %d shared-memory files left by dead engines", len(removed))
            self.space = iox.IpcSpace.for_engine(self.config.ipc_root)
            self.ionode = self.space.node(f"engine{os.getpid()}")
            self._open_inbox()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            modules = self.registry.multiprocess_modules()
            env = dict(os.environ)
            env.pop("PYTHONSTARTUP", None)
            # One BLAS/OpenMP thread per node process unless the operator says
            # otherwise (as Ray does for its workers): the pools these libraries
            # size to every core spin after each call, and beside the other
            # nodes' processes that is CPU taken from them. A node sets its own
            # model's threads through its params (explicit counts win).
            for var in THREAD_VARS:
                env.setdefault(var, "1")
            # Started from the loop thread on purpose: the zygote's parent-death
            # signal fires when the *thread* that started it ends.
            es = self.engine_space
            self._zygote = subprocess.Popen(  # noqa: ASYNC220
                [self.config.python_executable, "-m", "engine.zygote", str(theirs.fileno()),
                 es.root, es.prefix, str(es.inbox_slots), str(self.config.standby_processes), *modules],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
                cwd="/", start_new_session=True,
            )
            theirs.close()
            ours.setblocking(False)
            self._zsock = ours
            self._loop.add_reader(ours.fileno(), self._zygote_readable)
            self._refill()

    @property
    def engine_space(self) -> EngineSpace:
        assert self.space is not None
        return EngineSpace(self.space.root, self.space.prefix, self.inbox_slots)

    @property
    def inbox_slots(self) -> int:
        # room for prewarmed processes being retired while the cap is reached
        return 2 * self.config.caps.max_total_processes + 8

    def _open_inbox(self) -> None:
        assert self.space is not None and self._loop is not None
        service = iox.open_event_service(self.ionode, iox.ENGINE_INBOX, self.inbox_slots, "create")
        listener, fd = iox.make_listener(service, self.space)
        self._inbox_objs = [listener, service]
        self._inbox = Inbox(listener, fd, self._dispatch)
        self._inbox.attach(self._loop)

    def _dispatch(self, ids: set[int]) -> None:
        if len(ids) == 1:
            slot, ev = divmod(next(iter(ids)), iox.EV_SPAN)
            proc = self._slots.get(slot)
            if proc is not None:
                proc.on_events({ev})
            return
        by_slot: dict[int, set[int]] = {}
        for i in ids:
            slot, ev = divmod(i, iox.EV_SPAN)
            by_slot.setdefault(slot, set()).add(ev)
        for slot, evs in by_slot.items():
            proc = self._slots.get(slot)
            if proc is not None:
                proc.on_events(evs)

    def take_slot(self, proc: NodeProcess) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        elif self._next_slot < self.inbox_slots:
            slot = self._next_slot
            self._next_slot += 1
        else:
            raise ResourceLimitError("no free event slot for another node process",
                                     context={"field": "max_total_processes"})
        self._slots[slot] = proc
        return slot

    def free_slot(self, slot: int) -> None:
        if self._slots.pop(slot, None) is not None:
            heapq.heappush(self._free_slots, slot)

    def _zygote_readable(self) -> None:
        assert self._zsock is not None
        while True:
            try:
                data = self._zsock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._zygote_gone()
                return
            msg = pickle.loads(data)
            op = msg["op"]
            if op == "spawned":
                fut = self._pending.pop(msg["req"], None)
                if fut is not None and not fut.done():
                    fut.set_result((msg["pid"], msg.get("inbox")))
            elif op == "error":
                fut = self._pending.pop(msg["req"], None)
                if fut is not None and not fut.done():
                    fut.set_exception(InternalError(f"zygote refused: {msg['message']}"))
            elif op == "exited":
                pid = msg["pid"]
                self._exits[pid] = msg["status"]
                self.live.discard(pid)
                for fut in self._exit_waiters.pop(pid, []):
                    if not fut.done():
                        fut.set_result(msg["status"])
                if len(self._exits) > 4096:
                    self._exits.pop(next(iter(self._exits)))

    def _zygote_gone(self) -> None:
        if self._loop is not None and self._zsock is not None:
            self._loop.remove_reader(self._zsock.fileno())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(InternalError("the node-process zygote exited"))
        self._pending.clear()

    async def spawn(self, args: ProcessArgs, child_sock: socket.socket) -> tuple[int, str | None]:
        """Have the zygote start a node process: (its pid, its inbox's name if already made)."""
        await self.ensure_started()
        assert self._zsock is not None and self._loop is not None
        req = next(self._reqs)
        fut = self._loop.create_future()
        self._pending[req] = fut
        socket.send_fds(self._zsock, [pickle.dumps({"op": "spawn", "req": req, "args": args})],
                        [child_sock.fileno()])
        try:
            pid, inbox = await asyncio.wait_for(asyncio.shield(fut), self.config.session.spawn_timeout_secs)
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
        if pid in self._exits:
            return self._exits[pid]
        assert self._loop is not None
        fut = self._loop.create_future()
        self._exit_waiters.setdefault(pid, []).append(fut)
        try:
            return await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            return None

    def check_capacity(self, wanted: int) -> None:
        cap = self.config.caps.max_total_processes
        running = len(self.live) - len(self._pool)  # idle prewarmed processes are there to be used
        if running + wanted > cap:
            raise ResourceLimitError(
                f"engine-wide process cap reached: {running} running, "
                f"{wanted} more requested, cap {cap}",
                context={"field": "max_total_processes", "limit": cap},
            )

    # ------------------------------------------------------------ prewarmed pool

    async def prewarm(self) -> None:
        """Start the zygote and fill the pool now (rather than at the first session)."""
        await self.ensure_started()
        if self._filling:
            await asyncio.gather(*self._filling, return_exceptions=True)

    def take_prewarmed(self, capacity: int) -> NodeProcess | None:
        """A prewarmed process whose channels fit, or None (then the caller launches one)."""
        if capacity == self.config.session.channel_capacity:
            while self._pool:
                proc = self._pool.pop(0)
                if proc.alive:
                    proc.on_exit = None
                    assert self._loop is not None
                    self._loop.call_soon(self._refill)
                    return proc
        elif self._pool and len(self.live) >= self.config.caps.max_total_processes:
            self._retire(self._pool.pop(0))  # make room under the cap for a process that fits
        return None

    def _refill(self) -> None:
        if self._closing or self._loop is None or self._pool_failures >= 3:
            return
        want = self.config.prewarm_processes - len(self._pool) - len(self._filling)
        room = self.config.caps.max_total_processes - len(self.live) - len(self._filling)
        for _ in range(min(want, room)):
            task = self._loop.create_task(self._fill_one(), name="prewarm")
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _fill_one(self) -> None:
        s = self.config.session
        proc = NodeProcess(self, iox.ChannelNames.for_prewarmed(os.urandom(6).hex()), s.channel_capacity)
        proc.on_exit = lambda: self._pool_exit(proc)
        try:
            await proc.launch()
            assert self._loop is not None
            msg = await proc.hello(self._loop.time() + s.spawn_timeout_secs, None)
            if not isinstance(msg, Hello):
                raise InternalError(f"prewarmed process {proc.pid} failed to start: {msg!r}")
        except BaseException as exc:
            await self._dispose(proc)
            if not isinstance(exc, asyncio.CancelledError):
                self._pool_failures += 1
                log.warning("could not prewarm a node process: %s", exc)
                return
            raise
        self._pool_failures = 0
        self._pool.append(proc)

    def _pool_exit(self, proc: NodeProcess) -> None:
        if proc in self._pool:
            self._pool.remove(proc)
            self._pool_failures += 1
            log.warning("prewarmed node process %s exited", proc.pid)
            self._retire(proc)
            self._refill()

    def _retire(self, proc: NodeProcess) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._dispose(proc), name="prewarm-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _dispose(proc: NodeProcess) -> None:
        try:
            await proc.stop(1.0)
            await proc.reaped()
        finally:
            proc.release()

    def cleanup_dead(self) -> None:
        if self.ionode is not None:
            try:
                self.ionode.try_cleanup_dead_nodes()
            except Exception:  # pragma: no cover
                log.exception("iceoryx2 dead-node cleanup failed")

    async def aclose(self) -> None:
        self._closing = True
        for task in self._filling:
            task.cancel()
        await asyncio.gather(*self._filling, *self._retiring, return_exceptions=True)
        pool, self._pool = self._pool, []
        await asyncio.gather(*(self._dispose(p) for p in pool), return_exceptions=True)
        if self._zsock is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._zsock.fileno())
                except (ValueError, RuntimeError):
                    pass
            self._zsock.close()  # EOF: the zygote kills any child left and exits
            self._zsock = None
        if self._zygote is not None:
            try:
                await asyncio.to_thread(self._zygote.wait, 5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                await asyncio.to_thread(self._zygote.wait)
            self._zygote = None
        if self._inbox is not None:
            self._inbox.detach()
            self._inbox = None
        iox.delete(*self._inbox_objs)
        self._inbox_objs.clear()
        self.cleanup_dead()
        self.ionode = None
        if self.space is not None:
            self.space.remove()
            self.space = None

    def runner(self, session: Any, planned: PlannedNode) -> ProcessRunner:
        return ProcessRunner(self, session, planned)

    async def monitor_memory(self, session: Any) -> None:
        """Fail the session when its processes' memory exceeds its limit.

        PSS is what the limit means, but reading it walks page tables (~1 ms
        a process here). RSS bounds PSS from above and costs a tiny read, so
        PSS is only taken when RSS passes the limit, and every
        `_PSS_EVERY`-th sample for the peak-memory metric.
        """
        limit = session.settings.max_session_memory_mb * 1024 * 1024
        interval = session.settings.memory_sample_interval_ms / 1000
        tick = 0
        while True:
            await asyncio.sleep(interval)
            pids = [r.pid for r in session.runners.values() if isinstance(r, ProcessRunner) and r.pid]
            if not pids:
                continue
            tick += 1
            if resident_bytes(pids) <= limit and tick % _PSS_EVERY != 1:
                continue
            used = await asyncio.to_thread(process_memory, pids)
            session.metrics.peak_memory_bytes = max(session.metrics.peak_memory_bytes, used)
            if used > limit:
                raise ResourceLimitError(
                    f"session processes use {used / 2**20:.1f} MiB, over max_session_memory_mb="
                    f"{session.settings.max_session_memory_mb}",
                    context={"field": "max_session_memory_mb", "used_bytes": used},
                )


class NodeProcess:
    """One forked node process, with the engine's ends of its channels and control lane.

    Launched generic (it knows its channels, not its node); a ProcessRunner
    assigns it one node of one session, at once or later when it is taken
    from the prewarmed pool. It owns the pid (watched through a pidfd on the
    loop), the control channel and every iceoryx2 object the engine made for
    it, and releases all of them.
    """

    def __init__(self, manager: ProcessManager, names: iox.ChannelNames, capacity: int) -> None:
        self.manager = manager
        self.names = names
        self.capacity = capacity
        self.pid: int | None = None
        self.ctrl: AsyncChannel | None = None
        self.sender: FrameSender | None = None
        self.receiver: FrameReceiver | None = None
        #: called (on the loop) when frames or a credit request came from the process
        self.on_data: Callable[[], None] | None = None
        self.exited: asyncio.Future | None = None
        #: called once, on the loop, when the process is gone
        self.on_exit: Callable[[], None] | None = None
        self.slot: int | None = None
        self._pidfd: int | None = None
        self._ctrl_sock: socket.socket | None = None
        self._iox: list[Any] = []
        self._pub: Any = None
        self._to_node: Any = None

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done()

    async def launch(self) -> None:
        """Fork the process and make the engine's ends of its channels (then await hello())."""
        m = self.manager
        await m.ensure_started()
        assert m.space is not None
        loop = asyncio.get_running_loop()
        self.slot = m.take_slot(self)
        args = ProcessArgs(m.engine_space, self.names, self.capacity, self.slot)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctrl_sock = ours  # closed by release() if launch() stops before the channel owns it
        try:
            self.pid, inbox = await m.spawn(args, theirs)
        finally:
            theirs.close()
        self.exited = loop.create_future()
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._on_pidfd)
        self.ctrl = await AsyncChannel.open(ours)
        self._ctrl_sock = None
        # Each side makes the channel it publishes on, in parallel; each then
        # opens the other's once told it exists (ChannelsReady / OutputsReady).
        self._make_inputs()
        self.ctrl.send(ChannelsReady())
        if inbox is not None:  # a standby process made it already (else, or if it is gone, see hello())
            self._connect_to(inbox, outputs=False)

    async def hello(self, deadline: float, node_id: str | None) -> Any:
        """Wait for the process's Hello, connecting to its outputs and inbox on
        the way; returns any other message instead (a Failure, None = gone)."""
        s = self.manager.config.session
        failed: str | None = None
        while True:
            try:
                msg = await self.recv(deadline, "start (process alive, channels open)", "spawn_timeout_secs",
                                      s.spawn_timeout_secs, node_id)
            except NodeExecutionError:
                if failed is None:
                    raise
                raise InternalError(f"cannot open the channels of node process {self.pid}: {failed}",
                                    node_id=node_id) from None
            if isinstance(msg, OutputsReady):
                failed = self._connect_to(msg.inbox)
            elif failed is None or msg is None or isinstance(msg, Failure):
                # (a process already gone when its channels were opened explains itself)
                return msg

    def _connect_to(self, inbox: str, outputs: bool = True) -> str | None:
        """Open the process's inbox and (with `outputs`) its output channel; the error, if that failed."""
        try:
            if self._to_node is None:
                self._open_inbox(inbox)
            if outputs:
                self._connect()
        except Exception as exc:  # noqa: BLE001 - reported with what the process says next
            return f"{type(exc).__name__}: {exc}"
        return None

    # Kept out of launch(): a traceback holding launch()'s frame must not keep
    # iceoryx2 services (and their fds and files) alive.

    def _make_inputs(self) -> None:
        service = iox.open_frames_service(self.manager.ionode, self.names.inputs, self.capacity, "create")
        self._pub = iox.publisher(service)
        self._iox = [self._pub, service]  # ports before services: delete() drops them in this order

    def _open_inbox(self, inbox: str) -> None:
        node_ev = iox.open_event_service(self.manager.ionode, inbox, how="open")
        self._to_node = node_ev.notifier_builder().create()
        self._iox = [self._to_node, *self._iox, node_ev]

    def _connect(self) -> None:
        out_svc = iox.open_frames_service(self.manager.ionode, self.names.outputs, self.capacity, "open")
        sub = iox.subscriber(out_svc, self.capacity)
        self.sender = FrameSender(self._pub, self._to_node)
        self.receiver = FrameReceiver(sub, self._to_node)
        self._iox = [sub, *self._iox, out_svc]

    async def recv(self, deadline: float, what: str, key: str, value: float, node_id: str | None) -> Any:
        """The next control message, or a typed error once `deadline` (loop time) passes."""
        assert self.ctrl is not None
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self.ctrl.recv(), max(0.0, remaining))
        except TimeoutError:
            raise NodeExecutionError(f"{what} did not finish within {key}={value:g}s",
                                     node_id=node_id, context={"field": key}) from None

    def on_events(self, ids: set[int]) -> None:
        if iox.EV_CREDIT in ids and self.sender is not None:
            self.sender.on_credit()
        if iox.EV_WANT_CREDIT in ids and self.receiver is not None:
            self.receiver.want_credit = True
        if (iox.EV_DATA in ids or iox.EV_WANT_CREDIT in ids) and self.on_data is not None:
            self.on_data()

    def _on_pidfd(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(None)
            if self.sender is not None:
                self.sender.close()
            if self.on_exit is not None:
                self.on_exit()

    async def stop(self, grace: float) -> None:
        """Shutdown request → exit within `grace`, else SIGTERM, then SIGKILL of its process group."""
        if self.pid is None or not self.alive:
            return
        assert self.exited is not None
        if self.ctrl is not None:
            self.ctrl.send(Shutdown())
            await asyncio.wait({self.exited}, timeout=grace)
        for sig, wait in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)):
            if self.exited.done():
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:  # pragma: no cover
                os.kill(self.pid, sig)
            await asyncio.wait({self.exited}, timeout=wait)
        if not self.exited.done():  # pragma: no cover - SIGKILL did not end it
            log.error("node process %s did not exit after SIGKILL", self.pid)

    async def reaped(self) -> None:
        """Return once the zygote has reaped the process (gone means gone)."""
        if self.pid is not None:
            await self.manager.exit_status(self.pid, 2.0)

    def release(self) -> None:
        self.on_exit = None
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            try:
                loop.remove_reader(self._pidfd)
            except (ValueError, RuntimeError):
                pass
            os.close(self._pidfd)
            self._pidfd = None
        if self.slot is not None:
            self.manager.free_slot(self.slot)
            self.slot = None
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        if self._ctrl_sock is not None:
            self._ctrl_sock.close()
            self._ctrl_sock = None
        if self.sender is not None:
            self.sender.close()
        iox.delete(*self._iox)
        self._iox.clear()
        self._pub = self._to_node = None
        self.sender = self.receiver = None
        self.manager.cleanup_dead()


class ProcessRunner(NodeRunner):
    """Supervises the node process running one node of one session."""

    def __init__(self, manager: ProcessManager, session: Any, planned: PlannedNode) -> None:
        self.manager = manager
        self.session = session
        self.planned = planned
        self.node_id = planned.id
        self.stats = NodeStats()
        self.proc: NodeProcess | None = None
        s = session.settings
        self._drop = (not s.enable_backpressure) or s.overflow_policy != "block"
        self._pending_ends = max(1, len(planned.upstream))
        self._closing = False
        self._closed = False
        self._ctrl_task: asyncio.Task | None = None
        self._failure: Failure | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._pump_task: asyncio.Task | None = None
        self._ping_tokens = itertools.count(1)
        self._events_sent = 0
        self.log = logging.LoggerAdapter(log, {"session_id": session.id, "node_id": self.node_id})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ------------------------------------------------------------ start

    async def start(self, progress: ProgressFn) -> None:
        m, s = self.manager, self.session.settings
        loop = asyncio.get_running_loop()
        spec = self.planned.spec
        assign = Assign(self.session.id, self.node_id, spec.node_type, spec.module, spec.qualname,
                        dict(self.planned.decl.params), s.process_timeout_secs)
        proc = m.take_prewarmed(s.channel_capacity)
        if proc is not None:
            self.proc = proc
            proc.on_exit = self._on_exit
            self.log.debug("runs in prewarmed process %s (channels %s)", proc.pid, proc.names.inputs)
            assert proc.ctrl is not None
            proc.ctrl.send(assign)
        else:
            proc = await self._launch(assign)
        deadline = loop.time() + s.init_timeout_secs
        while True:
            msg = await proc.recv(deadline, "initialize()", "init_timeout_secs", s.init_timeout_secs, self.node_id)
            if isinstance(msg, Progress):
                progress(self.node_id, msg.phase, msg.percent, msg.message)
            elif isinstance(msg, Ready):
                break
            else:
                raise await self._start_failure(msg, "initialize")
        self._ctrl_task = self.session.track(self._control_loop(), f"{self.node_id}:control")
        proc.on_data = self._on_data
        self._on_data()  # outputs may already wait (a node that emits at start)

    async def _launch(self, assign: Assign) -> NodeProcess:
        """A new process for this node, up to its Hello.

        One that is gone before saying Hello without a word (the zygote's
        standby can die just as it is handed the request) is replaced once.
        """
        s, loop = self.session.settings, asyncio.get_running_loop()
        for attempt in (1, 2):
            proc = self.proc = NodeProcess(self.manager, iox.ChannelNames.for_node(self.session.id, self.node_id),
                                           s.channel_capacity)
            proc.on_exit = self._on_exit
            await proc.launch()
            assert proc.ctrl is not None
            proc.ctrl.send(assign)  # read by the process right after its Hello: no extra round trip
            msg = await proc.hello(loop.time() + s.spawn_timeout_secs, self.node_id)
            if isinstance(msg, Hello):
                return proc
            if msg is not None or attempt == 2:
                raise await self._start_failure(msg, "start")
            self.log.warning("node process %s exited while starting; starting another", proc.pid)
            proc.on_exit = None
            await proc.stop(0.0)
            await proc.reaped()
            proc.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _start_failure(self, msg: Any, where: str) -> EngineError:
        if isinstance(msg, Failure):
            return self._error_from(msg)
        status = await self.manager.exit_status(self.pid, 1.0) if self.pid else None
        return NodeExecutionError(f"node process {self.pid} {describe_status(status)} during {where}",
                                  node_id=self.node_id)

    def _error_from(self, f: Failure) -> EngineError:
        cls = _ERROR_CLASSES.get(f.error_type, NodeExecutionError)
        tail = "\n".join(f.traceback.strip().splitlines()[-6:]) if f.traceback else ""
        return cls(f.message, node_id=self.node_id, traceback_text=f.traceback,
                   context={"where": f.where, "sequence": f.sequence, "traceback_tail": tail})

    # ------------------------------------------------------------ supervise

    def _on_exit(self) -> None:
        # While starting, start() reads the control lane itself and reports
        # the death (with the node's Failure, when it sent one).
        if not self._closing and self._ctrl_task is not None:
            self.session.track(self._report_death(), f"{self.node_id}:death")

    async def _report_death(self) -> None:
        status = await self.manager.exit_status(self.pid or -1, 1.0)
        await asyncio.sleep(0)  # let a Failure already on the control lane be read first
        if self._failure is not None:
            err = self._error_from(self._failure)
        elif status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            # the worker's deadline timer (see Worker._arm) fired
            limit = self.session.settings.process_timeout_secs
            err = NodeExecutionError(f"process() exceeded process_timeout_secs={limit:g}; its node process "
                                     f"{self.pid} was stopped", node_id=self.node_id,
                                     context={"field": "process_timeout_secs", "limit": limit})
        else:
            err = NodeExecutionError(f"node process {self.pid} {describe_status(status)}",
                                     node_id=self.node_id, context={"exit_status": status})
        self.manager.cleanup_dead()
        self.session.fail_soon(err)

    async def _control_loop(self) -> None:
        assert self.proc is not None and self.proc.ctrl is not None
        ctrl = self.proc.ctrl
        while True:
            msg = await ctrl.recv()
            if msg is None:
                return
            if isinstance(msg, Failure):
                self._failure = msg
                if not self._closing:
                    self.session.fail_soon(self._error_from(msg))
            elif isinstance(msg, Stats):
                self._merge(msg)
            elif isinstance(msg, ShutdownAck):
                if msg.stats is not None:
                    self._merge(msg.stats)
            elif isinstance(msg, Pong):
                if msg.stats is not None:
                    self._merge(msg.stats)
                fut = self._pings.pop(msg.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def refresh_stats(self) -> None:
        """Bring `stats` up to date with the node process's own counters (a ping round
        trip; gives up after a second, leaving the last numbers)."""
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None or self._closing:
            return
        token = next(self._ping_tokens)
        fut = self._pings[token] = asyncio.get_running_loop().create_future()
        ctrl.send(Ping(token))
        try:
            await asyncio.wait_for(fut, 1.0)
        except TimeoutError:
            pass
        finally:
            self._pings.pop(token, None)

    def _merge(self, st: Stats) -> None:
        self.stats.busy_s = st.busy_s
        self.stats.cpu_s = st.cpu_s
        self.stats.extra["process_items_in"] = st.items_in
        self.stats.extra["process_items_out"] = st.items_out
        for key, value in st.extra.items():
            self.stats.extra[f"process_{key}"] = value

    def _on_data(self) -> None:
        """Outputs of the node process → the session, in order, from the inbox callback.

        While outputs can be routed without waiting (a sink's output with room
        in the caller's queue), they are handled right here, without a task
        switch; the first one that needs waiting (a downstream push, a full
        queue, end of stream) starts a pump task, which drains the channel and
        ends when it is empty.
        """
        if self._pump_task is not None or self.proc is None or self.proc.receiver is None:
            return  # the pump drains what came
        receiver = self.proc.receiver
        try:
            while (item := self._next_output(receiver)) is not None:
                if item is EOS or not self.session.emit_nowait(self.node_id, item):
                    self._pump_task = self.session.track(self._pump(item), f"{self.node_id}:pump")
                    return
        except Exception as exc:  # a callback's exception would only reach the loop's log
            self.session.fail_soon(exc if isinstance(exc, EngineError)
                                   else InternalError(f"{type(exc).__name__}: {exc}", node_id=self.node_id))

    async def _pump(self, item: Any) -> None:
        try:
            receiver = self.proc.receiver if self.proc is not None else None
            n = 0
            while receiver is not None and item is not None:
                if item is EOS:
                    await self.session.node_ended(self.node_id)
                    return
                await self.session.emit(self.node_id, item)
                n += 1
                if n % 16 == 0:
                    await asyncio.sleep(0)  # yield: a busy channel must not starve the loop
                item = self._next_output(receiver)
        finally:
            self._pump_task = None

    def _next_output(self, receiver: FrameReceiver) -> Any:
        """The next frame (counted), EOS, or None when the channel is empty (credit given)."""
        item = receiver.receive()
        if item is None:
            receiver.freed()
        elif item is not EOS:
            self.stats.items_out += 1
        return item

    # ------------------------------------------------------------ data in

    async def push(self, frame: Any) -> None:
        sender = self.proc.sender if self.proc is not None else None
        if sender is None or self._closing:
            raise InternalError("node process is not running", node_id=self.node_id)
        self.stats.items_in += 1
        try:
            if not await sender.send(codec.prepare(frame), drop_when_full=self._drop):
                self.stats.dropped += 1
        except ChannelClosed:
            raise self._gone() from None

    async def turn_event(self, event: TurnEvent) -> None:
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None or self._closing:
            return
        ctrl.send(DeliverTurnEvent(event.kind, event.turn_id, dict(event.data), event.source, event.sequence))
        self._events_sent += 1

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends == 0 and self.proc is not None and self.proc.sender is not None:
            if self._events_sent:
                # The control lane and the data channel do not keep order
                # between them: once this ping is answered, the process has
                # taken every event sent before it, so none arrives after EOS.
                await self.refresh_stats()
            # The process may have failed (and been released) while the ping
            # was out: then the session's error is the answer, not a send.
            sender = self.proc.sender if self.proc is not None else None
            if sender is None:
                raise self._gone()
            try:
                await sender.send(codec.eos_prepared())
            except ChannelClosed:
                raise self._gone() from None

    def _gone(self) -> EngineError:
        """Why a frame cannot reach the node process: the session's error if it has one."""
        return self.session.error or NodeExecutionError(
            f"node process {self.pid} exited", node_id=self.node_id)

    # ------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        proc = self.proc
        if proc is None:
            return
        try:
            await proc.stop(self.session.settings.shutdown_timeout_secs)
            await self._drain_control()
            await proc.reaped()
        finally:
            proc.release()

    async def _drain_control(self) -> None:
        # The session cancels its tasks (the control loop among them) before
        # closing runners; the last Stats / ShutdownAck still sit in the
        # socket of the exited process: read them so the final numbers count.
        task = self._ctrl_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None:
            return
        try:
            async with asyncio.timeout(0.2):
                while (msg := await ctrl.recv()) is not None:
                    if isinstance(msg, Stats):
                        self._merge(msg)
                    elif isinstance(msg, ShutdownAck) and msg.stats is not None:
                        self._merge(msg.stats)
        except (TimeoutError, ValueError, pickle.UnpicklingError):
            pass
