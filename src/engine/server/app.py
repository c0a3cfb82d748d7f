"""The engine as a remotemedia.v1 gRPC server.

`EngineServer` wires the servicers, API-key auth, the standard health
service, server reflection and the Prometheus endpoint around one `Engine`.
It runs on whatever loop is running (the CLI installs uvloop); `serve()` is
the CLI's main: it adds SIGTERM/SIGINT handlers that drain.

Draining: health turns NOT_SERVING (and keeps answering), new sessions are
refused with RESOURCE_LIMIT, running sessions get `drain_timeout_secs` to
finish, then the remaining calls are cancelled and every session is torn
down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._proto import execution_pb2, streaming_pb2
from ..config import RuntimeConfig
from ..engine import Engine
from ..errors import ResourceLimitError, ValidationError
from .auth import ApiKeyInterceptor
from .decode import add_servicer
from .execution import PipelineExecutionServicer
from .metrics import ServerMetrics
from .streaming import LINGER_S, StreamingPipelineServicer

log = logging.getLogger("engine.server")

SERVICE_NAMES = (
    execution_pb2.DESCRIPTOR.services_by_name["PipelineExecutionService"].full_name,
    streaming_pb2.DESCRIPTOR.services_by_name["StreamingPipelineService"].full_name,
)


class EngineServer:
    def __init__(self, config: Any = None, *, host: str | None = None, port: int | None = None,
                 metrics_port: int | None = None) -> None:
        self.config = RuntimeConfig.load(config)
        s = self.config.server
        self.host = host if host is not None else s.host
        self.port = port if port is not None else s.port
        self.metrics_port = metrics_port if metrics_port is not None else s.metrics_port
        self.metrics = ServerMetrics()
        self.engine = Engine(self.config, observer=self.metrics)
        self.engine.on_serving = self._serving_changed
        self.metrics.bind(self.engine)
        self.health = health.aio.HealthServicer()
        self._server: aio.Server | None = None
        self.bound_port = 0
        self.bound_metrics_port = 0
        self._stopped = False
        self._health_updates: set[asyncio.Task] = set()

    def _serving_changed(self, serving: bool) -> None:
        """Health follows whether node processes can start (NOT_SERVING while the zygote is down)."""
        if self._stopped or self._server is None:
            return
        log.log(logging.INFO if serving else logging.WARNING, "health: %s",
                "SERVING" if serving else "NOT_SERVING (node processes cannot start)")

        async def update() -> None:
            for name in ("", *SERVICE_NAMES):  # the state now, should it have changed again meanwhile
                status = (health_pb2.HealthCheckResponse.SERVING if self.engine.serving
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                await self.health.set(name, status)

        task = asyncio.get_running_loop().create_task(update(), name="health")
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        caps = self.config.caps
        options = [
            ("grpc.max_receive_message_length", caps.max_message_bytes),
            ("grpc.max_send_message_length", caps.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            # engines that run a node here ping every fraction of a second to notice a
            # hang or a dropped network (executors.remote): bear their keepalive
            ("grpc.http2.min_ping_interval_without_data_ms", 100),
            ("grpc.http2.max_ping_strikes", 0),
        ]
        interceptors = [ApiKeyInterceptor(self.config.server.api_keys)] if self.config.server.api_keys else []
        server = aio.server(options=options, interceptors=interceptors)
        add_servicer(server, PipelineExecutionServicer(self.engine, self.metrics),
                     execution_pb2.DESCRIPTOR.services_by_name["PipelineExecutionService"])
        add_servicer(server, StreamingPipelineServicer(self.engine, self.metrics, self.config.server),
                     streaming_pb2.DESCRIPTOR.services_by_name["StreamingPipelineService"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.port}"
        try:
            self.bound_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ValidationError(f"cannot listen on {address}: {exc}") from None
        if not self.bound_port:
            raise ValidationError(f"cannot listen on {address} (address in use?)")
        await self.engine.start()
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port:
            self.bound_metrics_port = self.metrics.serve_http(self.host, self.metrics_port)
        log.info("serving remotemedia.v1 on %s:%d (auth %s)", self.host, self.bound_port,
                 "on" if self.config.server.api_keys else "off")
        return self.bound_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.bound_port}"

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, let running sessions finish (up to `grace_s`), then tear everything down."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.server.drain_timeout_secs if grace_s is None else grace_s
        await asyncio.gather(*self._health_updates, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        self.engine.stop_accepting()
        if self.engine.sessions:
            log.info("draining: waiting up to %.1f s for %d session(s)", grace, len(self.engine.sessions))
            try:
                async with asyncio.timeout(grace):
                    await self.engine.wait_idle()
            except TimeoutError:
                sessions = list(self.engine.sessions.values())
                log.warning("drain deadline passed with %d session(s) running; tearing them down", len(sessions))
                # each stream answers this error and ends normally before the server stops
                err = ResourceLimitError("server is shutting down: drain deadline passed",
                                         context={"field": "drain_timeout_secs", "limit": grace})
                await asyncio.gather(*(s.fail(err) for s in sessions), return_exceptions=True)
        if self._server is not None:
            # Calls that answered get their linger (see StreamCall._let_client_finish)
            # and a little more; those still open then are cancelled, and their
            # sessions tear down in their own `finally`.
            await self._server.stop(grace=LINGER_S + 1.0)
        await self.engine.aclose()
        self.metrics.close()
        log.info("server stopped")

    async def aclose(self) -> None:
        await self.drain(grace_s=0)

    async def __aenter__(self) -> EngineServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def serve(config: Any = None, *, host: str | None = None, port: int | None = None,
                metrics_port: int | None = None) -> int:
    """Run the server until SIGTERM or SIGINT, then drain; returns the exit code."""
    server = EngineServer(config, host=host, port=port, metrics_port=metrics_port)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received: draining")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.drain()
    return 0


__all__ = ["SERVICE_NAMES", "EngineServer", "serve"]
