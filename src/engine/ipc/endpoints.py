"""Where a node process's channels live: values the engine and its node processes share.

`EngineSpace` and `ProcessArgs` travel from the engine to the zygote and on
to each child; `Endpoints` is a child's own iceoryx2 set-up, made before it
knows its node (the zygote's standby makes it ahead of any request).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from . import iox

try:  # imported here so the zygote preloads it (an import in the child costs ~6 ms a start)
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None  # type: ignore[assignment]


@dataclass(frozen=True)
class EngineSpace:
    """Where the engine's iceoryx2 files are and how many slots its inbox has (fixed per engine)."""

    root: str
    prefix: str
    inbox_slots: int


@dataclass(frozen=True)
class ProcessArgs:
    """What a node process needs before it knows its node: where its channels are."""

    space: EngineSpace
    names: iox.ChannelNames
    capacity: int
    #: this process's slot on the engine's inbox
    slot: int


class Endpoints:
    """A process's own iceoryx2 set-up, independent of any session: its
    iceoryx2 node, a notifier on the engine's inbox, and its own inbox.

    The zygote keeps one standby child with these made (and its event loop
    created) before anyone asks for a process; a child forked on demand makes
    them first thing.
    """

    def __init__(self, es: EngineSpace) -> None:
        self.space = iox.IpcSpace(es.root, es.prefix)
        self.ionode = self.space.node(f"w{os.getpid()}")
        self.to_engine = iox.open_event_service(self.ionode, iox.ENGINE_INBOX, es.inbox_slots,
                                                "open").notifier_builder().create()
        self.inbox_name = f"rm/proc/{os.getpid()}x{os.urandom(4).hex()}/inbox"
        self.listener, self.fd = iox.make_listener(
            iox.open_event_service(self.ionode, self.inbox_name, how="create"), self.space)
        self.loop: Any = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
