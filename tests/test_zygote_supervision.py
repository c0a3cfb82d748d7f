"""The zygote is supervised: killed with SIGKILL, it is started again (a
bounded number of times), sessions starting meanwhile wait for it or get a
typed error, and health says NOT_SERVING while no node process can start.

(Its standby and the prewarmed pool are replaced when one of them is killed:
test_multiprocess.test_zygote_standby_is_used_once_and_replaced_when_it_dies,
test_prewarm.test_a_dead_prewarmed_process_is_replaced.)
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import psutil
import pytest
from conftest import eventually, manifest, probed_engine
from grpc_client import CLOSE, chunk, collect, init, kinds, proto_manifest, requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import ErrorType, RuntimeData
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.errors import EngineError, InternalError

pytestmark = pytest.mark.multiprocess

ECHO = manifest([{"id": "e", "node_type": "EchoNode"}])
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def echo_once(engine, text: str) -> str:
    result = await engine.execute(ECHO, {"e": RuntimeData.text(text)})
    return result.outputs["e"].text


def kill_zygote(engine) -> int:
    pid = engine.process_manager().zygote_pid
    assert pid is not None and psutil.pid_exists(pid), "no zygote to kill"
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_a_killed_zygote_is_restarted_and_a_session_started_meanwhile_does_not_hang():
    async with probed_engine(prewarm_processes=1) as engine:
        assert await echo_once(engine, "before") == "before"
        old = kill_zygote(engine)
        async with asyncio.timeout(30):  # never hangs: it waits for the new zygote, or fails typed
            try:
                assert await echo_once(engine, "meanwhile") == "meanwhile"
            except EngineError as exc:
                assert exc.error_type in (ErrorType.INTERNAL, ErrorType.NODE_EXECUTION), exc
        pm = engine.process_manager()
        await eventually(lambda: pm.serving and pm.zygote_pid not in (None, old), "a new zygote")
        assert await echo_once(engine, "after") == "after"
        await eventually(lambda: len(pm.pool.idle) == 1, "the prewarmed pool refilled from the new zygote",
                         timeout_s=30.0)  # a new zygote and a process from it: slow on a loaded host
        assert psutil.Process(pm.pool.idle[0].pid).ppid() == pm.zygote_pid


async def test_restarts_are_bounded_then_sessions_fail_typed():
    async with probed_engine(zygote_restarts_per_minute=1) as engine:
        assert await echo_once(engine, "a") == "a"
        pm = engine.process_manager()
        first = kill_zygote(engine)
        await eventually(lambda: pm.serving and pm.zygote_pid not in (None, first), "the one allowed restart")
        assert await echo_once(engine, "b") == "b"
        kill_zygote(engine)
        await eventually(lambda: not pm.serving and pm.zygote_pid is None, "no restart past the bound")
        for _ in range(2):  # every later session: the same typed error, at once
            with pytest.raises(InternalError, match="zygote_restarts_per_minute") as info:
                async with asyncio.timeout(10):
                    await echo_once(engine, "c")
            assert info.value.error_type is ErrorType.INTERNAL
        assert not engine.serving


async def test_health_is_not_serving_while_the_zygote_is_down_and_serving_after(make_server):
    server = await make_server(prewarm_processes=1)
    async with grpc.aio.insecure_channel(server.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        kill_zygote(server.engine)
        async with asyncio.timeout(30):
            assert (await watch.read()).status == NOT_SERVING
            assert (await watch.read()).status == SERVING
        watch.cancel()
        call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline(requests(
            init(proto_manifest([("e", "EchoNode")])), chunk("e", RuntimeData.text("hi"), 1), CLOSE))
        responses = await collect(call)
        assert kinds(responses)[0] == "ready" and "error" not in kinds(responses), kinds(responses)


async def test_health_stays_not_serving_once_restarts_are_used_up(make_server):
    server = await make_server(zygote_restarts_per_minute=0, prewarm_processes=1)
    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
        kill_zygote(server.engine)

        async def status() -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

        async with asyncio.timeout(10):
            while await status() != NOT_SERVING:  # noqa: ASYNC110 - the state of another process
                await asyncio.sleep(0.02)
        for _ in range(2):  # the first may still be handed a prewarmed process that died with the zygote
            call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline(requests(
                init(proto_manifest([("e", "EchoNode")])), CLOSE))
            responses = await collect(call)
            assert kinds(responses) == ["error"], kinds(responses)
        assert responses[0].error.error_type == ErrorType.INTERNAL.value
        assert "zygote_restarts_per_minute" in responses[0].error.message
        assert await status() == NOT_SERVING
