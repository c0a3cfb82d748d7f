"""Node processes are told apart in ps/top: their command line names node, type and session."""

from __future__ import annotations

from pathlib import Path

import psutil
from conftest import manifest

from engine import RuntimeData
from engine.zygote import NODE_NAME


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def test_node_processes_are_titled_with_node_type_and_session(mp_engine):
    doc = manifest([{"id": "first", "node_type": "EchoNode"}, {"id": "second", "node_type": "EchoNode"}])
    async with mp_engine.stream(doc) as session:
        await session.send("first", RuntimeData.text("hi"))
        out = await anext(session)
        assert out.node_id == "second"
        zygote = psutil.Process(mp_engine.process_manager().zygote_pid)
        nodes = [p.pid for p in zygote.children() if _comm(p.pid) == NODE_NAME]
        titles = sorted(_cmdline(pid) for pid in nodes)
        assert titles == [f"{NODE_NAME} first (EchoNode) session {session.id}",
                          f"{NODE_NAME} second (EchoNode) session {session.id}"]
        await session.close()
