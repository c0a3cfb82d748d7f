"""The engine's one iceoryx2 event inbox for all its node processes.

Each process notifies on its own slot (event id = slot × EV_SPAN + event),
so one listener on the loop serves every process; the slot table maps an
event back to the process it came from.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Any, Protocol

from ...errors import ResourceLimitError
from ...ipc import iox
from ...ipc.channel import Inbox


class EventTarget(Protocol):
    def on_events(self, ids: set[int]) -> None: ...


class EngineInbox:
    def __init__(self, ionode: Any, space: iox.IpcSpace, slots: int, loop: asyncio.AbstractEventLoop) -> None:
        self.slots = slots
        service = iox.open_event_service(ionode, iox.ENGINE_INBOX, slots, "create")
        listener, fd = iox.make_listener(service, space)
        self._objs = [listener, service]
        self._inbox: Inbox | None = Inbox(listener, fd, self._dispatch)
        self._inbox.attach(loop)
        self._targets: dict[int, EventTarget] = {}  # slot → process
        self._free: list[int] = []
        self._next = 0

    def _dispatch(self, ids: set[int]) -> None:
        if len(ids) == 1:
            slot, ev = divmod(next(iter(ids)), iox.EV_SPAN)
            target = self._targets.get(slot)
            if target is not None:
                target.on_events({ev})
            return
        by_slot: dict[int, set[int]] = {}
        for i in ids:
            slot, ev = divmod(i, iox.EV_SPAN)
            by_slot.setdefault(slot, set()).add(ev)
        for slot, evs in by_slot.items():
            target = self._targets.get(slot)
            if target is not None:
                target.on_events(evs)

    def take_slot(self, target: EventTarget) -> int:
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next < self.slots:
            slot = self._next
            self._next += 1
        else:
            raise ResourceLimitError("no free event slot for another node process",
                                     context={"field": "max_total_processes"})
        self._targets[slot] = target
        return slot

    def free_slot(self, slot: int) -> None:
        if self._targets.pop(slot, None) is not None:
            heapq.heappush(self._free, slot)

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.detach()
            self._inbox = None
        iox.delete(*self._objs)
        self._objs.clear()
