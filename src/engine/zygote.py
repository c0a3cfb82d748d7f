"""The engine's node-process zygote (the "forkserver" role).

Started once per engine as `python -m engine.zygote FD MODULES...` — a fresh
interpreter, so it inherits nothing from the host application: not its
`__main__`, not its iceoryx2 objects, sockets or signal handlers. It imports
numpy, iceoryx2, the worker and the node modules once, then forks a node
process per request in about a millisecond; children share the preloaded
pages copy-on-write. It holds no iceoryx2 object itself (one must never
cross a fork).

Protocol on its SOCK_SEQPACKET socket with the engine (pickled dicts):
  engine → zygote  {"op": "spawn", "req": n, "args": worker.ProcessArgs} + the child's control fd
  zygote → engine  {"op": "spawned", "req": n, "pid": pid}
                   {"op": "exited", "pid": pid, "status": wait status}
                   {"op": "error", "req": n, "message": str}
End of the engine socket → the zygote kills every child's process group and exits.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver `sig` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass


def _child(ctrl_fd: int, args, close_fds: list[int]) -> None:
    code = 70
    try:
        os.setsid()  # own process group: the engine kills the whole group
        set_parent_death_signal(signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        from engine import worker

        code = worker.run(ctrl_fd, args)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine orchestrates shutdown
    for name in ("numpy", "iceoryx2", "orjson", "engine.worker", "engine.ipc.channel", *argv[1:]):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken node module fails its nodes, not the zygote
            print(f"zygote: cannot preload {name}: {exc}", file=sys.stderr)
    rsig, wsig = os.pipe()
    os.set_blocking(wsig, False)
    os.set_blocking(rsig, False)
    signal.set_wakeup_fd(wsig)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "engine")
    sel.register(rsig, selectors.EVENT_READ, "sigchld")

    def reply(msg: dict) -> None:
        try:
            sock.send(pickle.dumps(msg))
        except OSError:
            pass

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            reply({"op": "exited", "pid": pid, "status": status})

    try:
        while True:
            for key, _ in sel.select():
                if key.data == "sigchld":
                    try:
                        os.read(rsig, 4096)
                    except BlockingIOError:
                        pass
                    reap()
                    continue
                try:
                    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
                except (ConnectionError, OSError):
                    data, fds = b"", []
                if not data:
                    return 0
                msg = pickle.loads(data)
                if msg["op"] != "spawn" or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    reply({"op": "error", "req": msg.get("req"), "message": "bad request"})
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(fds[0], msg["args"], [sock.fileno(), rsig, wsig])
                os.close(fds[0])
                children.add(pid)
                reply({"op": "spawned", "req": msg["req"], "pid": pid})
    finally:
        for pid in list(children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
