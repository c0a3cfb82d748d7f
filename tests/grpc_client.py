"""Helpers for tests that talk to a real server through the project's stubs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import psutil

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import streaming_pb2 as spb
from engine.server import wire

CLOSE = spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))
CANCEL = spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CANCEL))


def proto_manifest(nodes: list[tuple[str, str, dict[str, Any]] | tuple[str, str]],
                   connections: Iterable[tuple[str, str]] | None = None, *, name: str = "test",
                   multiprocess: dict[str, Any] | None = None, executor: dict[str, str] | None = None,
                   ) -> epb.PipelineManifest:
    """Proto manifest as a client builds it; connections default to a chain."""
    m = epb.PipelineManifest(version="v1", metadata=epb.ManifestMetadata(name=name))
    if multiprocess:
        m.metadata.multiprocess_json = json.dumps(multiprocess)
    for spec in nodes:
        nid, node_type = spec[0], spec[1]
        params = spec[2] if len(spec) > 2 else {}  # type: ignore[misc]
        n = m.nodes.add(id=nid, node_type=node_type, params=json.dumps(params) if params else "")
        if executor and nid in executor:
            n.executor = executor[nid]
    if connections is None:
        ids = [s[0] for s in nodes]
        connections = list(zip(ids, ids[1:], strict=False))
    for a, b in connections:
        m.connections.add(**{"from": a, "to": b})
    return m


def proto_manifest_from_dict(doc: dict[str, Any]) -> epb.PipelineManifest:
    """A JSON manifest as the proto a gRPC client sends."""
    from engine.manifest_proto import to_proto

    return to_proto(doc)


def buffer(frame: RuntimeData) -> pb.DataBuffer:
    return wire.to_proto(frame)


def init(manifest: epb.PipelineManifest, **kw: Any) -> spb.StreamRequest:
    return spb.StreamRequest(init=spb.StreamInit(manifest=manifest, **kw))


def chunk(node_id: str, frame: RuntimeData, sequence: int) -> spb.StreamRequest:
    return spb.StreamRequest(data_chunk=spb.DataChunk(node_id=node_id, buffer=buffer(frame), sequence=sequence))


async def requests(*items: spb.StreamRequest) -> AsyncIterator[spb.StreamRequest]:
    for item in items:
        yield item


async def collect(call: Any) -> list[spb.StreamResponse]:
    """Every response until the end of the call (also after earlier `read()`s)."""
    import grpc

    out = []
    while (resp := await call.read()) is not grpc.aio.EOF:
        out.append(resp)
    return out


async def until_ready(call: Any) -> None:
    """Read a stream's responses up to `ready` (init progress before it); an error or the end
    of the stream instead fails with what the server said."""
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            raise AssertionError("the stream ended before it was ready")
        kind = resp.WhichOneof("response")
        if kind == "ready":
            return
        if kind == "error":
            raise AssertionError(f"the stream failed before it was ready: {resp.error}")


def kinds(responses: list[spb.StreamResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in responses]


def node_processes(zygote_pid: int | None) -> set[int]:
    """Descendants of this process other than the engine's zygote and its
    standby (not yet any node's): node processes."""
    from engine.zygote import STANDBY_NAME

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid != zygote_pid and p.name() != STANDBY_NAME:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out
