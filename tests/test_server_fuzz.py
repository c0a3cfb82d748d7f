"""Whatever a client sends, a stream ends (closed or error, status OK) and leaves nothing running."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from grpc_client import collect, init, kinds, proto_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire

MANIFESTS = [
    proto_manifest([("p", "PassThroughNode")]),
    proto_manifest([("c", "AudioChunkerNode", {"chunk_size": 64}), ("e", "EchoNode")]),
    proto_manifest([("x", "NoSuchNode")]),
    proto_manifest([("c", "AudioChunkerNode", {"chunk_size": -1})]),
]


def _audio(n: int, broken: bool) -> pb.DataBuffer:
    buf = wire.to_proto(RuntimeData.audio(np.zeros(n, np.float32), 16000))
    if broken:
        buf.audio.num_samples = n + 1
    return buf


chunks = st.builds(
    lambda node, seq, n, broken, text: spb.StreamRequest(data_chunk=spb.DataChunk(
        node_id=node, sequence=seq,
        buffer=wire.to_proto(RuntimeData.text("t")) if text else _audio(n, broken))),
    st.sampled_from(["p", "c", "e", "zz", ""]), st.integers(0, 6), st.integers(0, 300), st.booleans(),
    st.booleans())
controls = st.sampled_from([spb.StreamControl.COMMAND_CLOSE, spb.StreamControl.COMMAND_CANCEL,
                            spb.StreamControl.COMMAND_UNSPECIFIED]).map(
    lambda c: spb.StreamRequest(control=spb.StreamControl(command=c)))
requests_ = st.lists(st.one_of(chunks, chunks, chunks, controls,
                               st.sampled_from(MANIFESTS).map(init), st.just(spb.StreamRequest())),
                     max_size=8)


async def _play(channel: grpc.aio.Channel, first: spb.StreamRequest | None,
                rest: list[spb.StreamRequest]) -> list[spb.StreamResponse]:
    async def gen():
        if first is not None:
            yield first
        for r in rest:
            yield r
        # then half-close, as clients that send everything at once do

    call = spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(gen())
    async with asyncio.timeout(30):  # a hang is the failure this test looks for
        responses = await collect(call)
    assert await call.code() == grpc.StatusCode.OK
    return responses


async def test_any_request_sequence_ends_cleanly(server, channel):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.one_of(st.none(), st.sampled_from(MANIFESTS).map(init), chunks), requests_)
    def check(first, rest):
        # hypothesis drives a sync function: run each example on the test's loop
        future = asyncio.run_coroutine_threadsafe(_check(first, rest), loop)
        future.result(60)

    async def _check(first, rest):
        close = spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))
        responses = await _play(channel, first, [*rest, close])
        k = kinds(responses)
        assert k and k[-1] in ("error", "closed"), k
        async with asyncio.timeout(10):
            while server.engine.sessions or server.engine.process_count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)
