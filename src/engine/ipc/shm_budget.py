"""Room in /dev/shm, checked before iceoryx2 is asked for memory.

iceoryx2 sizes a publisher's data segment when it is made (max slice length
× slots, see IPC-NOTES trap 8) with ftruncate: on tmpfs that is sparse, so
it always succeeds, and a full /dev/shm shows only later, as SIGBUS in
whichever process first touches a page that has no room (the engine
included). Segments are meant to stay mostly sparse (a 16 MiB-frame
channel promises GiBs it never touches), so the engine does not count
promises; it checks that the pages it is about to touch fit: a node's
channels at its start (the slots beyond capacity that every channel
uses), and one slot of the new size before a frame makes a channel grow.
It is a check, not a reservation: /dev/shm filled by someone else between
the check and the write is not covered.
"""

from __future__ import annotations

import os

from ..errors import ResourceLimitError

SHM_DIR = "/dev/shm"
#: slots of a channel's segment beyond its capacity: borrowed (iox.open_frames_service) + loans (iox.publisher)
EXTRA_SLOTS = 6 + 4
#: a publisher's first max slice length (iox.publisher's default)
INITIAL_SLICE = 64 * 1024


def next_slice(nbytes: int) -> int:
    """The slice length iceoryx2 grows to for a frame of `nbytes` (AllocationStrategy.PowerOfTwo)."""
    return 1 << max(0, nbytes - 1).bit_length()


def channels_bytes(n: int = 2) -> int:
    """What `n` new channels touch first: their extra slots at the first slice length."""
    return n * INITIAL_SLICE * EXTRA_SLOTS


def room() -> int:
    """Bytes /dev/shm can still take."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check(need: int, node_id: str | None, what: str) -> None:
    free = room()
    if need > free:
        raise ResourceLimitError(
            f"not enough shared memory for {what}: needs {need / 2**20:.1f} MiB, /dev/shm has "
            f"{max(free, 0) / 2**20:.1f} MiB left (make /dev/shm larger)",
            node_id=node_id, context={"field": "/dev/shm", "requested": need, "available": max(free, 0)})
