"""Peer transports measured in the same run as the engine: multiprocessing.Queue
and a bare iceoryx2 ping-pong written directly against the binding."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import time

import numpy as np


def _queue_echo(q_in, q_out) -> None:
    while True:
        item = q_in.get()
        if item is None:
            return
        q_out.put(item)


def queue_round_trips(payload: np.ndarray, n: int) -> list[float]:
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_queue_echo, args=(q_in, q_out), daemon=True)
    p.start()
    out = []
    for i in range(n + 20):
        t = time.perf_counter()
        q_in.put(payload)
        q_out.get()
        if i >= 20:
            out.append(time.perf_counter() - t)
    q_in.put(None)
    p.join(5)
    return out


def _iox_side(root: str, prefix: str, ping: str, pong: str, n: int) -> None:
    import iceoryx2 as iox2

    from engine.ipc import iox

    space = iox.IpcSpace(root, prefix)
    node = space.node(f"peer{os.getpid()}")
    s_in = iox.open_frames_service(node, ping, 4)
    s_out = iox.open_frames_service(node, pong, 4)
    ev_in = iox.open_event_service(node, ping + "-ev")
    ev_out = iox.open_event_service(node, pong + "-ev")
    sub = iox.subscriber(s_in, 4)
    pub = iox.publisher(s_out)
    listener = ev_in.listener_builder().create()
    notifier = ev_out.notifier_builder().create()
    while True:
        listener.blocking_wait()
        while True:
            smp = sub.receive()
            if smp is None:
                break
            size = smp.header.number_of_elements
            if size == 1:
                smp.delete()
                return
            out = pub.loan_slice_uninit(size)
            ctypes.memmove(out.payload_ptr, smp.payload_ptr, size)
            smp.delete()
            out.assume_init().send()
            notifier.notify()
    del iox2


def iox_round_trips(payload: np.ndarray, n: int) -> list[float]:
    """Bare iceoryx2 ping-pong: loan+copy+send+notify, blocking waits, both ways."""
    from engine.ipc import iox

    space = iox.IpcSpace.for_engine("/tmp/remotemedia-bench")
    tag = os.urandom(3).hex()
    ping, pong = f"bench/{tag}/ping", f"bench/{tag}/pong"
    node = space.node("bench-main")
    s_in = iox.open_frames_service(node, ping, 4)
    s_out = iox.open_frames_service(node, pong, 4)
    ev_in = iox.open_event_service(node, ping + "-ev")
    ev_out = iox.open_event_service(node, pong + "-ev")
    pub = iox.publisher(s_in)
    sub = iox.subscriber(s_out, 4)
    notifier = ev_in.notifier_builder().create()
    listener = ev_out.listener_builder().create()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_iox_side, args=(space.root, space.prefix, ping, pong, n), daemon=True)
    p.start()
    time.sleep(0.5)  # the peer opens its ports (set-up only, not measured)
    src = payload.view(np.uint8).reshape(-1)
    nbytes = src.nbytes
    out = []
    for i in range(n + 20):
        t = time.perf_counter()
        s = pub.loan_slice_uninit(nbytes)
        ctypes.memmove(s.payload_ptr, src.ctypes.data, nbytes)
        s.assume_init().send()
        notifier.notify()
        while True:
            smp = sub.receive()
            if smp is not None:
                break
            listener.blocking_wait()
        back = np.empty(nbytes, np.uint8)
        ctypes.memmove(back.ctypes.data, smp.payload_ptr, nbytes)
        smp.delete()
        if i >= 20:
            out.append(time.perf_counter() - t)
    s = pub.loan_slice_uninit(1)
    s.assume_init().send()
    notifier.notify()
    p.join(5)
    del pub, sub, notifier, listener, s_in, s_out, ev_in, ev_out, node
    space.remove()
    return out
