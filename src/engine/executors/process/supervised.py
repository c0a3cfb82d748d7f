"""One supervised node process: launch through the zygote, the handshake,
liveness (a pidfd on the loop: a death is known at once, not polled), and
stop → SIGTERM → SIGKILL of its process group."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import InternalError, NodeExecutionError
from ...ipc import iox, shm_budget
from ...ipc.channel import FrameReceiver, FrameSender
from ...ipc.control import AsyncChannel, ChannelsReady, Failure, OutputsReady, Shutdown
from ...ipc.endpoints import ProcessArgs

if TYPE_CHECKING:
    from .manager import ProcessManager

log = logging.getLogger("engine.process")


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
        #: the node it runs, once assigned (named in a shared-memory error)
        self.node_id: str | None = None
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
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            # Gone already (a standby killed just as it was handed the
            # request): its control lane ends, and hello() says so.
            self.exited.set_result(None)
        else:
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
        self.sender.grow_check = self._check_growth
        self.receiver = FrameReceiver(sub, self._to_node)
        self._iox = [sub, *self._iox, out_svc]

    def _check_growth(self, nbytes: int) -> None:
        """Before the input channel grows for a frame of `nbytes`: is there room in /dev/shm?"""
        shm_budget.check(shm_budget.next_slice(nbytes), self.node_id,
                         f"a {nbytes / 2**20:.1f} MiB frame to node {self.node_id!r}")

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
