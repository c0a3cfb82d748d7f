"""WASM nodes: the payload contract for every kind, state across frames, one
instance per session over one compiled module, validation of modules and
caps, mixed native → WASM → process pipelines through a real gRPC server,
and plugins that spin, bomb their memory, trap or fail, each a typed error
that leaves nothing behind.

The plugins are real: tests/wasm/contract.wat (compiled here by wasmtime)
and the C examples committed under examples/wasm/modules.
"""

from __future__ import annotations

import asyncio
import base64
import math
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import wasmtime
from conftest import manifest, probed_engine
from grpc_client import (
    CANCEL,
    CLOSE,
    buffer,
    chunk,
    collect,
    init,
    proto_manifest,
    requests,
    until_ready,
)

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.data import PixelFormat
from engine.errors import (
    TypeValidationError,
    ValidationError,
)
from engine.server import wire

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "wasm"


@pytest.fixture(scope="module")
def modules_dir(tmp_path_factory) -> Path:
    """The tests' plugin and the examples', as an operator's modules_dir."""
    d = tmp_path_factory.mktemp("wasm-modules")
    (d / "contract.wasm").write_bytes(wasmtime.wat2wasm((Path(__file__).parent / "wasm" / "contract.wat").read_text()))
    for built in (EXAMPLES / "modules").glob("*.wasm"):
        shutil.copy(built, d / built.name)
    (d / "notwasm.wasm").write_text("(module)")  # text, not a WebAssembly binary
    outside = d.parent / "outside.wasm"
    shutil.copy(d / "contract.wasm", outside)
    (d / "link.wasm").symlink_to(outside)
    return d


def wasm(node_id: str = "w", **params) -> dict:
    return {"id": node_id, "node_type": "WasmNode", "params": {"module": "contract.wasm", **params}}


async def run_one(engine, node: dict, frame: RuntimeData) -> list[RuntimeData]:
    result = await engine.execute(manifest([node]), {node["id"]: frame})
    return result.all_outputs.get(node["id"], [])


# ------------------------------------------------------------ the payload contract


async def test_payload_contract_for_every_kind(modules_dir):
    stereo = np.random.default_rng(1).standard_normal(2 * 300).astype(np.float32)
    tensor = np.arange(6, dtype=np.int32).reshape(2, 3)
    pixels = np.arange(4 * 2 * 3, dtype=np.uint8)
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        # audio: float32 interleaved, rate, channels and metadata kept
        audio = RuntimeData.audio(stereo, 48000, 2, metadata={"take": "1"}, timestamp_us=77)
        [out] = await run_one(engine, wasm(function="echo"), audio)
        assert (out.sample_rate, out.channels, out.metadata, out.timestamp_us) == (48000, 2, {"take": "1"}, 77)
        assert out.samples.dtype == np.float32 and np.array_equal(out.samples, stereo)
        # other sample formats arrive converted to float32
        ints = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
        [out] = await run_one(engine, wasm(function="echo"), RuntimeData.audio(ints, 16000))
        assert out.samples.dtype == np.float32
        assert np.allclose(out.samples, ints / 32768.0)
        # text as UTF-8 (the plugin upper-cases ASCII; other bytes pass), language kept
        [out] = await run_one(engine, wasm(function="upper"), RuntimeData.text("héllo wörld", language="de"))
        assert (out.text, out.language) == ("HéLLO WöRLD", "de")
        # JSON as its UTF-8 text
        value = {"a": [1, 2.5, None], "ü": "✓"}
        [out] = await run_one(engine, wasm(function="echo"), RuntimeData.json(value))
        assert out.value == value
        # binary raw
        blob = bytes(range(256)) * 5
        [out] = await run_one(engine, wasm(function="echo"), RuntimeData.binary(blob, "application/x-demo"))
        assert (out.data, out.mime_type) == (blob, "application/x-demo")
        # tensors: dtype kept, and the shape where the size matches
        [out] = await run_one(engine, wasm(function="echo"), RuntimeData.tensor(tensor, layout="HW"))
        assert out.array.dtype == np.int32 and out.array.shape == (2, 3) and out.layout == "HW"
        assert np.array_equal(out.array, tensor)
        [out] = await run_one(engine, wasm(function="half"), RuntimeData.tensor(tensor))
        assert out.array.dtype == np.int32 and out.array.shape == (3,)
        assert np.array_equal(out.array, tensor.reshape(-1)[:3])
        # video: its pixels, size and format kept
        video = RuntimeData.video(pixels, 4, 2, PixelFormat.RGB24, frame_number=5)
        [out] = await run_one(engine, wasm(function="echo"), video)
        assert (out.width, out.height, out.format, out.frame_number) == (4, 2, PixelFormat.RGB24, 5)
        assert np.array_equal(out.pixels, pixels)
        # an empty output is no frame
        assert await run_one(engine, wasm(function="empty"), RuntimeData.text("x")) == []
        # output_type: the plugin's bytes read as another kind (audio in, JSON out)
        [out] = await run_one(engine, wasm(module="rms.wasm", output_type="json"),
                              RuntimeData.audio(np.full(100, 0.5, np.float32), 16000))
        assert out.value == {"rms": 0.5, "peak": 0.5, "frames": 100}
        # config reaches the plugin as Extism config
        [out] = await run_one(engine, wasm(function="greeting", config={"greeting": "hello there"}),
                              RuntimeData.text("ignored"))
        assert out.text == "hello there"


async def test_audio_output_of_a_partial_frame_is_a_typed_error(modules_dir):
    stereo = RuntimeData.audio(np.zeros(2 * 10, np.float32), 16000, 2)
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        with pytest.raises(TypeValidationError) as err:
            await run_one(engine, wasm(function="odd"), stereo)
        assert err.value.node_id == "w" and err.value.context["field"] == "output_type"
        assert "whole number of float32 frames of 2 channel(s)" in str(err.value)
        # the engine goes on
        [out] = await run_one(engine, wasm(function="echo"), stereo)
        assert out.channels == 2


# ------------------------------------------------------------ state and instances


def _biquad_reference(x: np.ndarray, cutoff: float, rate: float, q: float = 0.70710678) -> np.ndarray:
    w = 2 * math.pi * cutoff / rate
    alpha, c = math.sin(w) / (2 * q), math.cos(w)
    a0 = 1 + alpha
    b0, b1, a1, a2 = (1 - c) / 2 / a0, (1 - c) / a0, -2 * c / a0, (1 - alpha) / a0
    y = np.zeros(len(x))
    x1 = x2 = y1 = y2 = 0.0
    for i, v in enumerate(x.astype(np.float64)):
        y[i] = b0 * v + b1 * x1 + b0 * x2 - a1 * y1 - a2 * y2
        x2, x1, y2, y1 = x1, v, y1, y[i]
    return y


async def test_a_stateful_plugin_keeps_its_state_across_frames(modules_dir):
    x = np.random.default_rng(2).standard_normal(2048).astype(np.float32)
    node = {"id": "lp", "node_type": "WasmNode",
            "params": {"module": "biquad.wasm", "config": {"cutoff_hz": "1000", "sample_rate": "16000"}}}
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        session = engine.stream(manifest([node]))
        async with session:
            for part in np.split(x, 8):  # the filter's memory crosses every frame boundary
                await session.send("lp", RuntimeData.audio(part, 16000))
            await session.close()
            y = np.concatenate([o.data.samples async for o in session])
    assert np.abs(y - _biquad_reference(x, 1000, 16000)).max() < 1e-5


async def test_each_session_has_its_own_instance_of_one_compiled_module(modules_dir):
    counter = manifest([wasm(function="count", output_type="binary")])
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        compiled = engine.wasm_executor().modules.compilations

        async def counts(n: int) -> list[int]:
            session = engine.stream(counter)
            async with session:
                for _ in range(n):
                    await session.send("w", RuntimeData.text("tick"))
                await session.close()
                return [int.from_bytes(o.data.data, "little") async for o in session]

        a, b = await asyncio.gather(counts(3), counts(2))
        assert (a, b) == ([1, 2, 3], [1, 2])  # neither saw the other's memory
        assert await counts(1) == [1]
        # compiled once, at the first validation; every session only instantiated it
        assert engine.wasm_executor().modules.compilations - compiled <= 1
        assert engine.wasm_executor().modules.compilations == 1


# ------------------------------------------------------------ validation


def _issue(engine, node: dict) -> tuple[str | None, str | None, str]:
    with pytest.raises(ValidationError) as err:
        engine.validate(manifest([node]))
    [issue] = err.value.issues
    return issue.node_id, issue.field, issue.message


BAD_NODES = {
    "parent directory": ({"module": "../outside.wasm"}, "module", "plain file name"),
    "absolute path": ({"module": "/etc/passwd"}, "module", "plain file name"),
    "subdirectory": ({"module": "sub/contract.wasm"}, "module", "plain file name"),
    "link out of the directory": ({"module": "link.wasm"}, "module", "outside the [wasm] modules_dir"),
    "missing module": ({"module": "missing.wasm"}, "module", "no module 'missing.wasm'"),
    "not WebAssembly": ({"module": "notwasm.wasm"}, "module", "not a WebAssembly binary"),
    "missing export": ({"module": "contract.wasm", "function": "nope"}, "function", "exports no function 'nope'"),
    "timeout over the cap": ({"module": "contract.wasm", "timeout_ms": 60_000}, "timeout_ms", "max_timeout_ms=5000"),
    "memory over the cap": ({"module": "contract.wasm", "max_memory_mb": 4096}, "max_memory_mb", "max_memory_mb=256"),
    "no module": ({"function": "echo"}, "module", "exactly one of"),
    "two modules": ({"module": "contract.wasm", "module_base64": "AGFzbQ=="}, "module", "exactly one of"),
    "unknown param": ({"module": "contract.wasm", "modul": "x"}, "modul", "Additional properties"),
    "config not strings": ({"module": "contract.wasm", "config": {"gain": 2}}, "config.gain", "not of type 'string'"),
    "bad output type": ({"module": "contract.wasm", "output_type": "audio/wav"}, "output_type", "is not one of"),
    "inline refused": ({"module_base64": "AGFzbQEAAAA="}, "module_base64", "allow_inline = true"),
}


@pytest.mark.parametrize("case", sorted(BAD_NODES))
async def test_validation_refuses_with_node_and_field(modules_dir, case):
    params, field, needle = BAD_NODES[case]
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        node_id, got_field, message = _issue(engine, {"id": "w", "node_type": "WasmNode", "params": params})
    assert (node_id, got_field) == ("w", field)
    assert needle in message


async def test_inline_modules_only_where_the_operator_allows_them(modules_dir):
    encoded = base64.b64encode((modules_dir / "contract.wasm").read_bytes()).decode()
    node = {"id": "w", "node_type": "WasmNode", "params": {"module_base64": encoded, "function": "upper"}}
    async with probed_engine(wasm={"allow_inline": True, "max_inline_bytes": 64 * 1024}) as engine:
        [out] = await run_one(engine, node, RuntimeData.text("inline"))
        assert out.text == "INLINE"
    async with probed_engine(wasm={"allow_inline": True, "max_inline_bytes": 100}) as engine:
        assert "max_inline_bytes=100" in _issue(engine, node)[2]
    async with probed_engine() as engine:  # the default: refused, and no module files either
        assert "allow_inline" in _issue(engine, node)[2]
        assert "no [wasm] modules_dir" in _issue(engine, wasm())[2]


async def test_the_executor_field(modules_dir):
    async with probed_engine(wasm={"modules_dir": str(modules_dir)}) as engine:
        plan = engine.plan(manifest([{**wasm(function="echo"), "executor": "wasm"}]))[1]
        assert plan.nodes["w"].executor == "wasm"
        assert "runs on the 'wasm' executor, not 'native'" in _issue(engine, {**wasm(), "executor": "native"})[2]
        passthrough = {"id": "p", "node_type": "PassThroughNode", "executor": "wasm"}
        assert "native, multiprocess or ray executor, not 'wasm'" in _issue(engine, passthrough)[2]


def test_the_validate_command_checks_wasm_nodes(tmp_path):
    config = EXAMPLES / "runtime.toml"
    ok = subprocess.run([sys.executable, "-m", "engine", "validate", str(EXAMPLES / "mixed_pipeline.json"),
                         "--config", str(config)], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.json"
    bad.write_text((EXAMPLES / "mixed_pipeline.json").read_text().replace('"gain.wasm"', '"../gain.wasm"'))
    refused = subprocess.run([sys.executable, "-m", "engine", "validate", str(bad), "--config", str(config)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2
    assert "node 'gain'" in refused.stderr and "plain file name" in refused.stderr


# ------------------------------------------------------------ through gRPC

#: native → WASM → process → WASM: resample, low-pass, a node process, gain
MIXED = [
    ("pass", "PassThroughNode"),
    ("lowpass", "WasmNode", {"module": "biquad.wasm", "config": {"cutoff_hz": "2000", "sample_rate": "16000"}}),
    ("echo", "EchoNode"),
    ("gain", "WasmNode", {"module": "gain.wasm", "config": {"gain": "0.5"}}),
]


def _expected(x: np.ndarray) -> np.ndarray:
    return 0.5 * _biquad_reference(x, 2000, 16000)


@pytest.fixture
async def wasm_server(make_server, modules_dir):
    return await make_server(wasm={"modules_dir": str(modules_dir)})


async def test_mixed_pipeline_batch_through_grpc(wasm_server):
    x = np.random.default_rng(3).standard_normal(4000).astype(np.float32)
    req = epb.ExecuteRequest(manifest=proto_manifest(MIXED))
    req.data_inputs["pass"].CopyFrom(buffer(RuntimeData.audio(x, 16000)))
    async with grpc.aio.insecure_channel(wasm_server.address) as ch:
        resp = await epb_grpc.PipelineExecutionServiceStub(ch).ExecutePipeline(req)
    assert resp.WhichOneof("outcome") == "result", resp.error
    out = wire.from_proto(resp.result.data_outputs["gain"])
    assert np.abs(out.samples - _expected(x)).max() < 1e-5
    assert wasm_server.engine.process_count == 0


async def test_mixed_pipeline_streaming_through_grpc(wasm_server):
    x = np.random.default_rng(4).standard_normal(16 * 512).astype(np.float32)
    parts = np.split(x, 16)
    async with grpc.aio.insecure_channel(wasm_server.address) as ch:
        call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline(requests(
            init(proto_manifest(MIXED)),
            *(chunk("pass", RuntimeData.audio(p, 16000), i) for i, p in enumerate(parts)), CLOSE))
        responses = await collect(call)
        assert await call.code() == grpc.StatusCode.OK
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    assert [r.sequence for r in results] == list(range(16))
    y = np.concatenate([wire.from_proto(r.data_outputs["gain"]).samples for r in results])
    assert np.abs(y - _expected(x)).max() < 1e-5
    closed = responses[-1].closed
    assert closed.final_metrics.node_metrics["gain"].items_processed == 16


FAULTS = {
    # export, params, error type, what the message says
    "spin": ("spin", {"timeout_ms": 200}, pb.ERROR_TYPE_NODE_EXECUTION, "ran past timeout_ms=200"),
    "memory bomb": ("bomb", {"max_memory_mb": 4}, pb.ERROR_TYPE_RESOURCE_LIMIT, "max_memory_mb=4"),
    "trap": ("trap", {}, pb.ERROR_TYPE_NODE_EXECUTION, "trapped"),
    "error_set": ("fail", {}, pb.ERROR_TYPE_NODE_EXECUTION, "failing on purpose"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
async def test_plugin_faults_are_typed_errors_and_the_engine_goes_on(wasm_server, case):
    function, params, error_type, needle = FAULTS[case]
    bad = proto_manifest([("pass", "PassThroughNode"), ("w", "WasmNode", {"module": "contract.wasm",
                                                                         "function": function, **params})])
    async with grpc.aio.insecure_channel(wasm_server.address) as ch:
        stub = spb_grpc.StreamingPipelineServiceStub(ch)
        responses = await collect(stub.StreamPipeline(requests(
            init(bad), chunk("pass", RuntimeData.text("x"), 0), CLOSE)))
        errors = [r.error for r in responses if r.WhichOneof("response") == "error"]
        assert len(errors) == 1
        err = errors[0]
        assert err.error_type == error_type and err.failing_node_id == "w"
        assert needle in err.message
        # the engine and a new session are unaffected
        good = await collect(stub.StreamPipeline(requests(
            init(proto_manifest([("w", "WasmNode", {"module": "contract.wasm", "function": "upper"})])),
            chunk("w", RuntimeData.text("still here"), 0), CLOSE)))
        texts = [wire.from_proto(r.result.data_outputs["w"]).text for r in good if r.WhichOneof("response") == "result"]
        assert texts == ["STILL HERE"]
    assert not wasm_server.engine.sessions


async def test_spinning_plugins_hold_up_no_other_session(wasm_server):
    spinning = proto_manifest([("w", "WasmNode", {"module": "contract.wasm", "function": "spin",
                                                  "timeout_ms": 5000})])
    echo = proto_manifest([("w", "WasmNode", {"module": "contract.wasm", "function": "upper"})])
    engine = wasm_server.engine
    async with grpc.aio.insecure_channel(wasm_server.address) as ch:
        stub = spb_grpc.StreamingPipelineServiceStub(ch)
        go_on = asyncio.Event()

        async def spin_requests():
            yield init(spinning)
            yield chunk("w", RuntimeData.text("spin"), 0)
            await go_on.wait()
            yield CANCEL

        # more spinning plugins than cores, each inside its endless loop
        spin_calls = [stub.StreamPipeline(spin_requests()) for _ in range(3)]
        for call in spin_calls:
            await until_ready(call)
        async with asyncio.timeout(10):
            while sum(r.stats.items_in for s in engine.sessions.values() for r in s.runners.values()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        spinners = list(engine.sessions.values())
        # while they spin (their limit is 5 s), other sessions' WASM nodes run to the end
        for i in range(5):
            good = await collect(stub.StreamPipeline(requests(
                init(echo), chunk("w", RuntimeData.text(f"run {i}"), 0), CLOSE)))
            assert [wire.from_proto(r.result.data_outputs["w"]).text for r in good
                    if r.WhichOneof("response") == "result"] == [f"RUN {i}"]
        assert all(s.state == "running" and s.error is None for s in spinners)  # still spinning
        # the clients cancel: the spinning calls are stopped, not left to their limit
        go_on.set()
        for call in spin_calls:
            await collect(call)
        for s in spinners:
            await s.wait_closed()
            assert s.error is None
    assert not engine.sessions
