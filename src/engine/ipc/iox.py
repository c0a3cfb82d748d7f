"""iceoryx2 set-up shared by the engine and its node processes.

Each engine instance gets its own root folder and file prefix (carrying the
engine's pid) so its files can be found, and swept when a previous engine
was killed. Every service name is scoped by session id + node id + port.
Traps handled here (see IPC-NOTES): signal handling disabled on every node,
no iceoryx2 object crosses a fork, DiscardData + no safe overflow (a full
subscriber buffer refuses instead of blocking or overwriting), 64-byte
payload alignment.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import iceoryx2 as iox2

from . import stale

iox2.set_log_level(iox2.LogLevel.Error)

PREFIX_RE = re.compile(r"^rme(\d+)x([0-9a-f]+)_")

# event ids on an inbox. A node process has its own inbox; the engine has
# one for all its node processes, where process slot k uses k * EV_SPAN + id.
EV_DATA = 1  # samples are waiting in a channel
EV_CREDIT = 2  # the consumer freed space (answer to EV_WANT_CREDIT)
EV_WANT_CREDIT = 3  # the producer found the channel full and waits
EV_SPAN = 4
ENGINE_INBOX = "rm/engine/inbox"


@dataclass(frozen=True)
class IpcSpace:
    """Where one engine's iceoryx2 files live."""

    root: str  # folder, with trailing slash
    prefix: str  # file-name prefix, e.g. "rme1234x9f3a_"
    #: the engine's liveness lock on its folder (stale.hold_lock); None in node processes
    lock_fd: int | None = field(default=None, compare=False)

    @classmethod
    def for_engine(cls, ipc_root: str) -> IpcSpace:
        token = f"rme{os.getpid()}x{os.urandom(3).hex()}_"
        root = os.path.join(ipc_root, token.rstrip("_")) + "/"
        Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root, token, stale.hold_lock(root))

    def config(self) -> iox2.config.Config:
        cfg = iox2.config.default()
        cfg.global_cfg.root_path = iox2.Path.new(self.root)
        cfg.global_cfg.prefix = iox2.FileName.new(self.prefix)
        return cfg

    def node(self, name: str) -> iox2.Node:
        return (iox2.NodeBuilder.new().name(iox2.NodeName.new(name)).config(self.config())
                .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
                .create(iox2.ServiceType.Ipc))

    def remove(self) -> None:
        """Remove everything under this space (the engine is shutting down)."""
        for f in os.listdir("/dev/shm"):
            if f.startswith(self.prefix):
                _unlink(f"/dev/shm/{f}")
        shutil.rmtree(self.root, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        try:  # the shared ipc_root folder too, once no engine uses it
            os.rmdir(os.path.dirname(self.root.rstrip("/")))
        except OSError:
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep_stale(ipc_root: str, own_prefix: str | None = None) -> list[str]:
    """Remove files left by engines that died without cleaning up; returns what was removed."""
    return stale.sweep(ipc_root, PREFIX_RE, own_prefix).paths


@dataclass(frozen=True)
class ChannelNames:
    """The services of one node of one session."""

    inputs: str  # engine → node frames
    outputs: str  # node → engine frames

    @classmethod
    def for_node(cls, session_id: str, node_id: str) -> ChannelNames:
        return cls.under(f"rm/{session_id}/{node_id}")

    @classmethod
    def for_prewarmed(cls, token: str) -> ChannelNames:
        """A prewarmed process's channels: made before its session exists, used by that one session only."""
        return cls.under(f"rm/prewarm/{token}")

    @classmethod
    def under(cls, base: str) -> ChannelNames:
        return cls(f"{base}/in", f"{base}/out")


def _finish(builder, how: str):
    """`create` (the caller publishes or listens: the service must be new), `open`
    (the peer made it: it must be complete) or `open_or_create`. Create and
    open fail, within iceoryx2's creation timeout, where open_or_create would
    keep retrying on a service left half made by a process that died making it."""
    return getattr(builder, how)()


def open_frames_service(node: iox2.Node, name: str, capacity: int, how: str = "open_or_create"):
    return _finish(node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1).max_subscribers(1).max_nodes(2)
            .subscriber_max_buffer_size(capacity)
            .subscriber_max_borrowed_samples(6)  # frames lent to a node (channel.BORROW_LIMIT) + 2
            .history_size(0)
            .enable_safe_overflow(False)
            .payload_alignment(iox2.Alignment.new(64)), how)


def open_event_service(node: iox2.Node, name: str, notifiers: int = 2, how: str = "open_or_create"):
    """An event service with one listener and up to `notifiers` notifiers
    (each with ids for EV_SPAN-wide slots 0 … notifiers-1)."""
    return _finish(node.service_builder(iox2.ServiceName.new(name)).event()
                   .max_notifiers(notifiers).max_listeners(1).max_nodes(notifiers + 1)
                   .event_id_max_value(notifiers * EV_SPAN), how)


def publisher(service, initial_bytes: int = 64 * 1024):
    return (service.publisher_builder().initial_max_slice_len(initial_bytes)
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .max_loaned_samples(4)  # one to send with, the rest for frames written in place
            .backpressure_strategy(iox2.BackpressureStrategy.DiscardData)
            .create())


def subscriber(service, capacity: int):
    return service.subscriber_builder().buffer_size(capacity).create()


def listener_fd(listener, space: IpcSpace, candidates: set[int]) -> int | None:
    """The unix datagram socket behind a Listener, so a loop can watch it.

    iceoryx2 binds each Ipc listener to <root><prefix><listener id>.event; the
    binding exposes no fd, so find the socket bound at that path among the
    fds created with the listener. None = not found (use the thread fallback).
    """
    expected = f"{space.root}{space.prefix}{listener.id.value}.event"
    for fd in sorted(candidates):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX and s.getsockname() == expected:
                return fd
        except OSError:
            pass
        finally:
            s.detach()
    return None


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def make_listener(event_service, space: IpcSpace):
    """Create a Listener and find its fd; returns (listener, fd or None)."""
    before = open_fds()
    listener = event_service.listener_builder().create()
    fd = listener_fd(listener, space, open_fds() - before)
    return listener, fd


# The binding's public loan/assume_init wrap the native methods in Python
# that re-checks the payload type on every call (typing.get_origin, ~2 µs a
# frame on each side); our channels are byte slices, so call the native ones.
loan_slice = getattr(iox2.Publisher, "__loan_slice_uninit", iox2.Publisher.loan_slice_uninit)
assume_init = getattr(iox2.SampleMutUninit, "__assume_init", iox2.SampleMutUninit.assume_init)


def event_id(k: int):
    return iox2.EventId.new(k)


def delete(*objs) -> None:
    """Release iceoryx2 objects now (ports before services before nodes)."""
    for obj in objs:
        if obj is not None and hasattr(obj, "delete"):
            try:
                obj.delete()
            except Exception:
                pass
