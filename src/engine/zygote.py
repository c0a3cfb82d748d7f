"""The engine's node-process zygote (the "forkserver" role).

Started once per engine as `python -m engine.zygote FD ROOT PREFIX SLOTS
STANDBYS MODULES...` — a fresh interpreter, so it inherits nothing from the host
application: not its `__main__`, not its iceoryx2 objects, sockets or signal
handlers. It imports numpy, iceoryx2, the worker and the node modules once,
then forks node processes; children share the preloaded pages copy-on-write.
It holds no iceoryx2 object itself (one must never cross a fork).

It keeps STANDBYS standby children (`standby_processes`): forked ahead, with
their event loop, iceoryx2 node and inbox already made (`ipc.endpoints.Endpoints`),
waiting on a private socket. A request is answered with the oldest, and new
standbys are forked once requests pause, so a burst past them forks on
demand and never waits for a standby.

Protocol on its SOCK_SEQPACKET socket with the engine: the typed messages
of `ipc.zygote_protocol` (Spawn → Spawned | Refused; Exited; Ping → Pong). End of the
engine socket → the zygote kills every child's process group and exits.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys

import setproctitle

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
#: process names (as `ps -o comm` and psutil's name() show them)
ZYGOTE_NAME, STANDBY_NAME, NODE_NAME = "rme-zygote", "rme-standby", "rme-node"


def _prctl(option: int, arg: int | bytes) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver `sig` to this process when its parent dies."""
    _prctl(PR_SET_PDEATHSIG, int(sig))


def set_process_name(name: str) -> None:
    """Linux: the name ps/top show for this process (15 bytes at most)."""
    _prctl(PR_SET_NAME, name.encode()[:15])


def set_node_title(node_id: str, node_type: str, session_id: str) -> None:
    """The command line ps, top -c and htop show for a node process: which node of which
    session it runs. The short name stays NODE_NAME, so every node process is found by it
    (as PostgreSQL's backends are all `postgres`)."""
    setproctitle.setproctitle(f"{NODE_NAME} {node_id} ({node_type}) session {session_id}")
    set_process_name(NODE_NAME)  # setproctitle sets it to the title's first 15 bytes


#: fork a new standby after this long without a request
STANDBY_DELAY_S = 0.01
#: standbys that died waiting, in a row, before the zygote stops keeping any
MAX_STANDBY_DEATHS = 3


def _become_child(close_fds: list[int]) -> None:
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


def _child(ctrl_fd: int, args, close_fds: list[int]) -> None:
    code = 70
    try:
        _become_child(close_fds)
        set_process_name(NODE_NAME)
        from engine import worker

        code = worker.run(ctrl_fd, args)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _standby(sock: socket.socket, space, close_fds: list[int]) -> None:
    code = 70
    try:
        _become_child(close_fds)
        set_process_name(STANDBY_NAME)
        from engine import worker
        from engine.ipc.endpoints import Endpoints

        endpoints = Endpoints(space)
        try:  # the engine opens it while this process starts
            sock.send(endpoints.inbox_name.encode())
        except OSError:  # already handed a request (still queued here): the process reports it itself
            pass
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
        except ConnectionError:  # the engine went away before handing a request
            data, fds = b"", []
        sock.close()
        if not data or len(fds) != 1:  # the zygote is gone
            code = 0
            return
        set_process_name(NODE_NAME)
        code = worker.run(fds[0], pickle.loads(data), endpoints)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    set_parent_death_signal(signal.SIGKILL)
    set_process_name(ZYGOTE_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine orchestrates shutdown
    from engine.ipc import zygote_protocol as zp
    from engine.ipc.endpoints import EngineSpace

    space = EngineSpace(argv[1], argv[2], int(argv[3]))
    n_standby = int(argv[4])
    for name in ("numpy", "iceoryx2", "orjson", "engine.worker", *argv[5:]):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken node module fails its nodes, not the zygote
            print(f"zygote: cannot preload {name}: {exc}", file=sys.stderr)
    # Children share the preloaded objects copy-on-write; keep their garbage
    # collector from walking (and so writing to) every one of them.
    gc.collect()
    gc.freeze()
    rsig, wsig = os.pipe()
    os.set_blocking(wsig, False)
    os.set_blocking(rsig, False)
    signal.set_wakeup_fd(wsig)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "engine")
    sel.register(rsig, selectors.EVENT_READ, "sigchld")

    def reply(msg: zp.ZygoteMessage) -> None:
        try:
            sock.send(zp.dumps(msg))
        except OSError:
            pass

    standbys: dict[int, socket.socket] = {}  # pid → socket, oldest first
    standby_deaths = 0  # in a row; past MAX_STANDBY_DEATHS, no more standbys
    # Sockets of standbys handed a request, kept open until they exit: closing
    # one with a message of theirs unread would reset the connection under the
    # request they have still to read.
    handed: dict[int, socket.socket] = {}

    def private_fds() -> list[int]:
        """The zygote's own descriptors, which no child keeps."""
        return [sock.fileno(), rsig, wsig, *(h.fileno() for h in handed.values()),
                *(h.fileno() for h in standbys.values())]

    def fork_standby() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            _standby(theirs, space, [*private_fds(), ours.fileno()])
        theirs.close()
        children.add(pid)
        standbys[pid] = ours

    def wants_standby() -> bool:
        return len(standbys) < n_standby and standby_deaths < MAX_STANDBY_DEATHS

    def reap() -> None:
        nonlocal standby_deaths
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            if pid in handed:
                handed.pop(pid).close()
            if pid in standbys:  # died waiting: not the engine's business
                standbys.pop(pid).close()
                standby_deaths += 1
                if standby_deaths == MAX_STANDBY_DEATHS:
                    print("zygote: standby processes keep dying; forking on demand only", file=sys.stderr)
                continue
            reply(zp.Exited(pid, status))

    def hand_over(args, ctrl_fd: int) -> tuple[int | None, str | None]:
        """Give the request to the oldest standby: (its pid or None, its inbox if it is made)."""
        nonlocal standby_deaths
        while standbys:
            pid = next(iter(standbys))
            ssock = standbys.pop(pid)
            try:
                try:
                    inbox: str | None = ssock.recv(4096, socket.MSG_DONTWAIT).decode() or None
                except BlockingIOError:  # still making it: the process reports it itself
                    inbox = None
                socket.send_fds(ssock, [pickle.dumps(args)], [ctrl_fd])
            except OSError:  # it died: the next one, or a fork
                ssock.close()
                continue
            handed[pid] = ssock
            standby_deaths = 0
            return pid, inbox
        return None, None

    for _ in range(n_standby):
        fork_standby()
    try:
        while True:
            events = sel.select(timeout=STANDBY_DELAY_S if wants_standby() else None)
            if not events and wants_standby():
                fork_standby()
            for key, _ in events:
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
                try:
                    msg = zp.loads(data)
                except Exception:  # noqa: BLE001 - answered, not fatal
                    msg = None
                if isinstance(msg, zp.Ping):
                    for fd in fds:
                        os.close(fd)
                    reply(zp.Pong(msg.req))
                    continue
                if not isinstance(msg, zp.Spawn) or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    reply(zp.Refused(getattr(msg, "req", None), "bad request"))
                    continue
                pid, inbox = hand_over(msg.args, fds[0])
                if pid is None:
                    pid = os.fork()
                    if pid == 0:
                        _child(fds[0], msg.args, private_fds())
                os.close(fds[0])
                children.add(pid)
                reply(zp.Spawned(msg.req, pid, inbox))
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
