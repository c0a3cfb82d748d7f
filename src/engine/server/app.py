"""The engine as a remotemedia.v1 gRPC server.

`EngineServer` wires the servicers, API-key auth, the standard health
service, server reflection and the Prometheus endpoint around one `Engine`.
It runs on whatever loop is running (the CLI installs uvloop); `serve()` is
the CLI's main: it adds SIGTERM/SIGINT handlers that drain.

Draining, as a load balancer understands it: health turns NOT_SERVING and
the server stops taking new calls at the connection level (its listener
closes and every connection gets an HTTP/2 GOAWAY), so a balancer (nginx,
Envoy, a Kubernetes Service) sends new sessions to another engine instead of
this one refusing them in-band. Running calls go on: their sessions get
`drain_timeout_secs` to finish, then the rest answer a RESOURCE_LIMIT error
("server is shutting down") and every session is torn down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._proto import execution_pb2, streaming_pb2
from ..config import RuntimeConfig
from ..engine import Engine
from ..errors import Issue, ResourceLimitError, ValidationError
from . import process, reflection
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
                 metrics_port: int | None = None, http_port: int | None = None,
                 tracer_provider: Any = None) -> None:
        self.config = RuntimeConfig.load(config)
        s = self.config.server
        self.host = host if host is not None else s.host
        self.port = port if port is not None else s.port
        self.metrics_port = metrics_port if metrics_port is not None else s.metrics_port
        #: the browser face's port (engine.web; 0 = off)
        self.http_port = http_port if http_port is not None else self.config.http.port
        self.http: Any = None
        self.metrics = ServerMetrics()
        self.engine = Engine(self.config, observer=self.metrics, tracer_provider=tracer_provider)
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
        """Bind and start serving; returns the bound port (useful with port 0).

        Nothing is left running when it fails (a port in use, a TLS file
        that does not load): the error names the setting.
        """
        s = self.config.server
        address = f"{self.host}:{self.port}"
        # what can fail is checked before anything starts: TLS files, the ports
        credentials = _server_credentials(s) if s.tls_cert_file else None
        reason = _bind_problem(self.host, self.port) if self.port else None
        if reason:  # said before gRPC tries (it would log its own multi-line error)
            raise ValidationError(Issue("server.port", f"cannot listen on {address}: {reason}", field="port"))
        if self.metrics_port:
            try:
                self.bound_metrics_port = self.metrics.serve_http(self.host, self.metrics_port)
            except OSError as exc:
                raise ValidationError(Issue("server.metrics_port", f"cannot serve metrics on "
                                            f"{self.host}:{self.metrics_port}: {exc.strerror or exc}",
                                            field="metrics_port")) from None
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
        interceptors = [ApiKeyInterceptor(s.api_keys)] if s.api_keys else []
        server = aio.server(options=options, interceptors=interceptors)
        try:
            add_servicer(server, PipelineExecutionServicer(self.engine, self.metrics),
                         execution_pb2.DESCRIPTOR.services_by_name["PipelineExecutionService"])
            add_servicer(server, StreamingPipelineServicer(self.engine, self.metrics, s),
                         streaming_pb2.DESCRIPTOR.services_by_name["StreamingPipelineService"])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable((*SERVICE_NAMES, health.SERVICE_NAME), server)
            try:
                bound = (server.add_secure_port(address, credentials) if credentials is not None
                         else server.add_insecure_port(address))
            except RuntimeError:
                bound = 0
            if not bound:
                reason = _bind_problem(self.host, self.port) or "refused by gRPC"
                raise ValidationError(Issue("server.port", f"cannot listen on {address}: {reason}", field="port"))
            self.bound_port = bound
            await self.engine.start()
            await server.start()
            if self.http_port:
                from ..web import HttpFace  # aiohttp and aiortc load only for the page

                self.http = HttpFace(self.engine, self.config.http, self.host, self.http_port)
                try:
                    await self.http.start()
                except OSError as exc:
                    raise ValidationError(Issue("http.port", f"cannot serve the page on {self.host}:"
                                                f"{self.http_port}: {exc.strerror or exc}", field="port")) from None
        except BaseException:
            if self.http is not None:
                await self.http.aclose()
            await server.stop(None)
            self.metrics.close()
            await self.engine.aclose()
            raise
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving remotemedia.v1 on %s:%d (%s, auth %s)", self.host, self.bound_port,
                 "TLS" if self.config.server.tls_cert_file else "plaintext",
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
        if self.http is not None:  # a browser conversation never ends by itself: end it now
            await self.http.aclose()
        self.engine.stop_accepting()
        stopping = None
        if self._server is not None:
            # no new call from here on; calls that answered get their linger
            # (see StreamCall._let_client_finish) and a little more; those still
            # open then are cancelled, and their sessions tear down in their own `finally`
            stopping = asyncio.get_running_loop().create_task(self._server.stop(grace=grace + LINGER_S + 1.0))
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
        if stopping is not None:
            await stopping
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


def _read_pem(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(Issue(f"server.{key}", f"cannot read {path}: {exc.strerror or exc}",
                                    field=key)) from None


def _server_credentials(s: Any) -> grpc.ServerCredentials:
    pair = (_read_pem(s.tls_key_file, "tls_key_file"), _read_pem(s.tls_cert_file, "tls_cert_file"))
    ca = _read_pem(s.tls_client_ca_file, "tls_client_ca_file") if s.tls_client_ca_file else None
    try:
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - gRPC checks PEM at bind
        raise ValidationError(Issue("server.tls_cert_file", f"TLS credentials rejected: {exc}")) from None


def _bind_problem(host: str, port: int) -> str | None:
    """Why binding host:port fails (gRPC says only that it did), or None if it can be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use (another server on this port?)"
        return exc.strerror or str(exc)
    return None


def _remove_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


async def serve(config: Any = None, *, host: str | None = None, port: int | None = None,
                metrics_port: int | None = None, http_port: int | None = None) -> int:
    """Run the server until SIGTERM or SIGINT, then drain; returns the exit code."""
    server = EngineServer(config, host=host, port=port, metrics_port=metrics_port, http_port=http_port)
    # A parent may have started us with these blocked (a script that blocks them
    # while it starts children): the drain would then never run.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    process.fixed_mmap_threshold(server.config.server.mmap_threshold_kib)
    loop = asyncio.get_running_loop()
    process.fixed_executor(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a signal while starting drains too
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        _remove_handlers(loop)
        raise
    trimmer = loop.create_task(process.trim_when_idle(server.engine), name="trim-when-idle")
    try:
        await stop.wait()
        log.info("signal received: draining")
    finally:
        trimmer.cancel()
        _remove_handlers(loop)
        await server.drain()
    return 0


__all__ = ["SERVICE_NAMES", "EngineServer", "serve"]
