from __future__ import annotations

import asyncio
import contextlib
import copy
from typing import Any

import pytest
from leakprobe import TEST_IPC_ROOT


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


@contextlib.asynccontextmanager
async def probed_engine(registry: Any = None, fd_slack: int = 0, **config: Any):
    """An engine with test nodes (or `registry`'s); once it is closed, nothing it started may remain
    (`fd_slack`: descriptors that may still be closing; see tests/test_remote.py)."""
    import leakprobe

    from engine import Engine

    before = leakprobe.snapshot()
    engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT, **config}, registry=registry)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()
    found = leakprobe.leaks(before)
    if found.get("fds", 0) <= fd_slack:
        found.pop("fds", None)
    assert found == {}


@pytest.fixture
async def mp_engine():
    """An engine with test nodes, checked for leaks after the test (engine closed)."""
    async with probed_engine() as engine:
        yield engine


async def eventually(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    """Wait for state outside this process (another process's start or exit) to show."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # noqa: ASYNC110 - nothing to await: it is another process's state
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def send_while_reading(session: Any, source: str, frames: list[Any]) -> tuple[list[int], list[int]]:
    """Send `frames` to `source` while a task reads the outputs, then close:
    (the outputs' sequences, how many frames the sender was ahead after each send)."""
    seen: list[int] = []
    ahead: list[int] = []

    async def read() -> None:
        async for out in session:
            seen.append(out.data.sequence)

    reader = asyncio.get_running_loop().create_task(read())
    for i, f in enumerate(frames):
        await session.send(source, f)
        ahead.append(i + 1 - len(seen))
    await session.close()
    await reader
    return seen, ahead


@pytest.fixture(scope="session", autouse=True)
def grpc_runtime():
    """Hold grpc.aio's process-wide runtime for the whole run.

    Its poller thread and descriptors live from the first aio object to the
    last one's garbage collection, which a test cannot time; holding one
    reference keeps them out of every test's leak accounting. So does gRPC
    core's event engine (an epoll and an eventfd, alive while any channel or
    server is): one idle channel, held over the run, keeps it there throughout.
    """
    import grpc
    from grpc._cython import cygrpc

    cygrpc.init_grpc_aio()
    anchor = grpc.insecure_channel("127.0.0.1:9")  # never used: nothing listens there
    yield
    anchor.close()
    cygrpc.shutdown_grpc_aio()


@pytest.fixture
async def make_server():
    """Start real gRPC servers on free loopback ports; leak-checked after the test."""
    import leakprobe

    from engine.server import EngineServer

    before = leakprobe.snapshot()
    servers = []

    async def make(**config: Any) -> EngineServer:
        cfg = {"test_nodes": True, "ipc_root": TEST_IPC_ROOT, **config}
        srv = EngineServer(cfg, host="127.0.0.1", port=0)
        await srv.start()
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in servers:
            await srv.aclose()
    assert leakprobe.leaks(before) == {}


@pytest.fixture
async def server(make_server):
    return await make_server()


@pytest.fixture
async def channel(server):
    import grpc

    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch
