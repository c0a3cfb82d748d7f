"""Crash recovery of shared memory: the files of engines that died without
cleaning up (kill -9, OOM kill) are found and removed; a live engine's never.

Each engine's iceoryx2 space (`iox.IpcSpace`) is `<ipc_root>/rme<pid>x<token>/`
plus `/dev/shm/rme<pid>x<token>_*`, and the engine holds an exclusive flock
on `<folder>/engine.lock` for as long as it runs. The kernel drops that lock
the moment the process dies, however it dies, so "can the lock be taken?" is
the liveness test: it does not depend on pids (reused; other pid namespaces
sharing /dev/shm). The lock file appears under its final name already locked
(made under a temporary name, then renamed), so a sweeper never sees a live
engine's lock free.

For a dead engine, iceoryx2's own dead-node detection goes first
(`Node.list` under its config; a node still Alive there, a node process that
outlived its engine, keeps the space; Dead ones are cleaned by
`try_remove_stale_resources`); what iceoryx2 leaves (listeners' sockets,
the per-prefix management object, the folder) is removed by prefix.
Files in /dev/shm whose folder is not under this `ipc_root` (an engine with
another root) can only be judged by their pid: removed when it is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field

import iceoryx2 as iox2

log = logging.getLogger("engine.ipc")

LOCK_NAME = "engine.lock"
SHM_DIR = "/dev/shm"


def hold_lock(folder: str) -> int:
    """Lock `folder` as a live engine's (returns the fd to keep open until the engine ends)."""
    tmp = os.path.join(folder, f".{LOCK_NAME}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, os.path.join(folder, LOCK_NAME))
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    return fd


@dataclass
class SweepReport:
    """What a sweep removed, by dead engine prefix; and the live engines it left alone."""

    removed: dict[str, list[str]] = field(default_factory=dict)
    #: how many of the removed files iceoryx2's own dead-node cleanup took away
    by_iceoryx2: int = 0
    live: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [p for paths in self.removed.values() for p in paths]


def sweep(ipc_root: str, prefix_re, own_prefix: str | None = None) -> SweepReport:
    """Remove every file of dead engines under `ipc_root` and in /dev/shm."""
    report = SweepReport()
    try:
        folders = sorted(e.name for e in os.scandir(ipc_root) if e.is_dir() and prefix_re.match(e.name + "_"))
    except FileNotFoundError:
        folders = []
    for name in folders:
        prefix = name + "_"
        if prefix == own_prefix:
            continue
        folder = os.path.join(ipc_root, name)
        fd = _take_lock(folder, prefix_re.match(prefix))
        if fd is None:
            report.live.append(prefix)
            continue
        try:
            before = _files_of(folder, prefix)
            if not _iceoryx2_cleanup(folder + "/", prefix):  # a process of that engine still runs there
                report.live.append(prefix)
                continue
            report.by_iceoryx2 += len(before - _files_of(folder, prefix))
            for path in _shm_paths(_shm_names(), prefix):
                _unlink(path)
            shutil.rmtree(folder, ignore_errors=True)
            report.removed[prefix] = sorted(before)
        finally:
            os.close(fd)
    by_folder = {f + "_" for f in folders}
    shm = _shm_names()
    for prefix in sorted({m.group(0) for n in shm if (m := prefix_re.match(n))} - by_folder):
        pid = int(prefix_re.match(prefix).group(1))
        if prefix == own_prefix or pid == os.getpid() or _pid_alive(pid):
            continue
        paths = [p for p in _shm_paths(shm, prefix) if _unlink(p)]
        if paths:
            report.removed[prefix] = paths
    if report.removed:
        log.info("removed the shared-memory files of %d dead engine(s): %d files",
                 len(report.removed), len(report.paths))
    return report


def _take_lock(folder: str, m) -> int | None:
    """The dead engine's lock (an fd to close after removing), or None while it lives."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # an engine from before the lock, or one making its folder right now: its pid decides
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            return None
        return os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _files_of(folder: str, prefix: str) -> set[str]:
    shm = set(_shm_paths(_shm_names(), prefix))
    return shm | {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files}


def _iceoryx2_cleanup(root: str, prefix: str) -> bool:
    """iceoryx2's own cleanup of the dead nodes of a space; False if a node there is alive."""
    cfg = iox2.config.default()
    cfg.global_cfg.root_path = iox2.Path.new(root)
    cfg.global_cfg.prefix = iox2.FileName.new(prefix)
    try:
        states = iox2.Node.list(iox2.ServiceType.Ipc, cfg)
    except Exception as exc:  # noqa: BLE001 - a damaged space is removed by prefix below
        log.debug("iceoryx2 could not list the nodes of %s: %s", prefix, exc)
        return True
    if any(isinstance(state, iox2.NodeState.Alive) for state in states):
        return False
    for state in states:
        if isinstance(state, iox2.NodeState.Dead):
            try:
                state._0.try_remove_stale_resources()
            except Exception as exc:  # noqa: BLE001 - removed by prefix below
                log.debug("iceoryx2 cleanup of a dead node of %s failed: %s", prefix, exc)
    return True


def _shm_names() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:  # pragma: no cover - not Linux
        return []


def _shm_paths(names: list[str], prefix: str) -> list[str]:
    return [f"{SHM_DIR}/{n}" for n in names if n.startswith(prefix)]


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
