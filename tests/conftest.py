from __future__ import annotations

import copy
from typing import Any

import pytest


def manifest(nodes: list[dict[str, Any]], connections: list[tuple[str, str]] | None = None,
             name: str = "test", **metadata: Any) -> dict[str, Any]:
    """Build a v1 manifest; connections default to a chain in node order."""
    if connections is None:
        connections = [(a["id"], b["id"]) for a, b in zip(nodes, nodes[1:], strict=False)]
    return {
        "version": "v1",
        "metadata": {"name": name, **metadata},
        "nodes": copy.deepcopy(nodes),
        "connections": [{"from": a, "to": b} for a, b in connections],
    }


@pytest.fixture
def make_manifest():
    return manifest


@pytest.fixture
async def mp_engine():
    """An engine with test nodes, checked for leaks after the test (engine closed)."""
    import leakprobe

    from engine import Engine

    before = leakprobe.snapshot()
    engine = Engine({"test_nodes": True, "ipc_root": "/tmp/remotemedia-engine-tests"})
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()
    assert leakprobe.leaks(before) == {}

