"""Frames that cross without a copy: outputs a node writes in place into the
shared-memory sample that carries them, and large inputs lent to a node as
views over the sample they came in.

Every engine here is closed under the leak probe (the `mp_engine` fixture's, or its own).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import manifest, probed_engine

from engine import Engine, RuntimeData
from engine.node import Node

pytestmark = pytest.mark.multiprocess


def generate(**params) -> dict:
    return manifest([{"id": "gen", "node_type": "GenerateNode", "params": params}])


async def run(engine: Engine, m: dict, n: int) -> list:
    async with engine.stream(m) as s:
        for _ in range(n):
            await s.send("gen", RuntimeData.text("go"))
        await s.close()
        outs = [o async for o in s]
    return outs, s.runners["gen"].stats.extra


def expected(nbytes: int, n: int) -> list[bytes]:
    return [bytes([i % 251]) * nbytes for i in range(n)]


@pytest.mark.parametrize("nbytes", [0, 1, 4096, 16 * 2**20])
async def test_in_place_outputs_arrive_intact_without_a_copy(mp_engine, nbytes):
    outs, stats = await run(mp_engine, generate(bytes=nbytes), 3)
    assert [o.data.array.tobytes() for o in outs] == expected(nbytes, 3)
    assert [o.sequence for o in outs] == [0, 1, 2]
    assert stats["process_sent_in_place"] == 3


async def test_in_place_copy_and_in_engine_outputs_are_identical(mp_engine):
    by_copy, stats = await run(mp_engine, generate(bytes=5000, in_place=False), 4)
    assert stats["process_sent_in_place"] == 0
    in_place, _ = await run(mp_engine, generate(bytes=5000), 4)
    async with Engine({"test_nodes": True, "multiprocess_enabled": False}) as native:
        in_engine, _ = await run(native, generate(bytes=5000), 4)
    for outs in (in_place, in_engine):
        assert [o.data.array.tobytes() for o in outs] == [o.data.array.tobytes() for o in by_copy]
        assert [(o.data.array.dtype, o.data.array.shape, o.sequence) for o in outs] == \
            [(o.data.array.dtype, o.data.array.shape, o.sequence) for o in by_copy]


async def test_a_frame_whose_metadata_outgrows_its_room_is_sent_by_copy(mp_engine):
    outs, stats = await run(mp_engine, generate(bytes=256, meta="n" * 5000), 2)
    assert [o.data.array.tobytes() for o in outs] == expected(256, 2)
    assert all(o.data.metadata["note"] == "n" * 5000 for o in outs)
    assert stats["process_sent_in_place"] == 0


async def test_full_channel_loses_nothing():
    # one-frame channels and a one-output queue: the node meets a full channel
    # with a sample it already wrote in place, and must still deliver it
    async with probed_engine(channel_capacity=1, output_queue_capacity=1) as engine, \
            engine.stream(generate(bytes=65536)) as s:
        async def feed():
            for _ in range(40):
                await s.send("gen", RuntimeData.text("go"))
            await s.close()

        feeder = asyncio.create_task(feed())
        outs = []
        async for o in s:
            outs.append(o)
            await asyncio.sleep(0.002)  # a slow consumer
        await feeder
    assert [o.data.array.tobytes() for o in outs] == expected(65536, 40)
    assert s.runners["gen"].stats.extra["process_items_out"] == 40


def test_new_frames_in_the_engine_process_are_plain_arrays():
    node = Node("n", {})
    t = node.new_tensor((2, 3), np.int32, layout="hw")
    a = node.new_audio(960, 48000, 2, np.int16)
    assert t.array.shape == (2, 3) and t.array.dtype == np.int32 and t.layout == "hw" and t.array.flags.writeable
    assert a.samples.size == 960 and a.channels == 2 and a.samples.dtype == np.int16


@pytest.mark.parametrize("zero_copy", [True, False])
async def test_lent_inputs_stay_intact_while_a_node_keeps_them(mp_engine, zero_copy):
    # 12 large inputs kept by the node: the first few are lent (read-only views
    # over their samples), the rest copied once the lending limit is reached;
    # later frames must not overwrite any kept one
    from engine.ipc.channel import BORROW_LIMIT, BORROW_MIN_BYTES
    from nodes.testing import checksum

    rng = np.random.default_rng(5)
    frames = [RuntimeData.tensor(rng.integers(0, 255, BORROW_MIN_BYTES * 2, dtype=np.uint8)) for _ in range(12)]
    frames.append(RuntimeData.tensor(np.arange(16, dtype=np.uint8)))  # small: always copied
    m = manifest([{"id": "hold", "node_type": "HoldNode", "params": {"zero_copy": zero_copy}}])
    async with mp_engine.stream(m) as s:
        for f in frames:
            await s.send("hold", f)
        await s.close()
        outs = [o.data.value async for o in s]
    assert [o["checksum"] for o in outs] == [checksum(f) for f in frames]
    writable = [o["writable"] for o in outs]
    if zero_copy:
        assert writable == [False] * BORROW_LIMIT + [True] * (len(frames) - BORROW_LIMIT)
    else:
        assert all(writable)
