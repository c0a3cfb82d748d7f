"""The embedding API: `Engine`, usable from any running asyncio loop.

    async with Engine() as engine:
        result = await engine.execute(manifest, {"in": RuntimeData.audio(x, 16000)})
        async with engine.stream(manifest) as session:
            await session.send("in", frame)
            ...

The engine owns what is shared by sessions: the node registry, the runtime
configuration and (lazily) the process pool's zygote. Each session owns its
own nodes and processes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .catalog import default_registry
from .config import ClientLimits, RuntimeConfig
from .data import DataKind, RuntimeData, concat
from .errors import EngineError, Issue, ResourceLimitError, ValidationError
from .executors.base import NodeRunner
from .executors.native import NativeRunner
from .manifest import Manifest, validate
from .plan import ExecutionPlan, PlannedNode, build_plan
from .registry import ExecutorRegistry
from .session import InitProgress, Observer, Output, OutputSink, Session
from .tracing import Tracing
from .tracing import tracer_provider as tracer_provider_for

log = logging.getLogger("engine")

_MANIFEST_CACHE = 256


def _cache_key(manifest: Any) -> Any:
    if isinstance(manifest, bytes):
        return manifest
    if isinstance(manifest, str):  # JSON text; a path is read again (the file may change)
        return manifest if manifest.lstrip().startswith("{") else None
    if hasattr(manifest, "SerializeToString"):
        return (type(manifest).__name__, manifest.SerializeToString(deterministic=True))
    return None


@dataclass
class ExecutionResult:
    outputs: dict[str, RuntimeData]
    #: every output of each sink, in order (outputs[] joins them)
    all_outputs: dict[str, list[RuntimeData]]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputLimit:
    """How many bytes a batch run's outputs may come to, all sinks together (a
    server's largest message, say). The run stops at the output that passes it:
    RESOURCE_LIMIT, naming that node and `setting`, instead of computing on
    for an answer that cannot be sent."""

    max_bytes: int
    #: the name the error gives the limit (the setting an operator would change)
    setting: str = "max_output_bytes"
    #: bytes of `max_bytes` kept for the rest of the answer (metrics, per-node results)
    reserve_bytes: int = 0


class _OutputBytes:
    """The payload bytes of a batch run's outputs as data.concat will join them."""

    def __init__(self, limit: OutputLimit) -> None:
        self.limit = limit
        self.total = 0
        self._picture: dict[str, int] = {}  # video: a sink's last picture is all that is kept

    def add(self, out: Output) -> None:
        n = out.data.nbytes
        if out.data.kind is DataKind.VIDEO:
            self.total -= self._picture.get(out.node_id, 0)
            self._picture[out.node_id] = n
        self.total += n
        lim = self.limit
        if self.total > lim.max_bytes - lim.reserve_bytes:
            raise ResourceLimitError(
                f"the outputs came to {self.total:,} bytes with this node's latest: more than one answer "
                f"may carry ({lim.setting} = {lim.max_bytes:,} bytes); the run was stopped there",
                node_id=out.node_id,
                context={"field": lim.setting, "limit": lim.max_bytes, "output_bytes": self.total})


def check_executors(m: Manifest, config: RuntimeConfig, registry: ExecutorRegistry,
                    wasm: Callable[[], Any] | None = None) -> None:
    """What only the executors and the operator's settings can tell of a valid
    manifest: the hosts its remote nodes name, its WASM nodes' modules and caps,
    a Ray cluster for the nodes placed there.
    `wasm` gives the engine's WASM executor (its compiled-module cache)."""
    issues = []
    if config.ray.place_by_capabilities or any(n.executor == "ray" for n in m.nodes):
        from .executors import ray_cluster

        issues += ray_cluster.check(m, registry, config.ray)
    if any(n.host for n in m.nodes):
        from .executors import remote

        issues += remote.check(m, config.remote)
    if any(n.node_type == "WasmNode" and not n.host for n in m.nodes):
        if wasm is None:
            from .executors.wasm import WasmExecutor

            issues += WasmExecutor(config.wasm).check(m)
        else:
            issues += wasm().check(m)
    if issues:
        raise ValidationError(issues)


class Engine:
    def __init__(self, config: Any = None, *, registry: ExecutorRegistry | None = None,
                 observer: Observer | None = None, tracer_provider: Any = None) -> None:
        self.config = RuntimeConfig.load(config)
        self.observer = observer
        #: OpenTelemetry (engine.tracing): the app's provider, or one made from [tracing]
        provider = tracer_provider if tracer_provider is not None else tracer_provider_for(self.config.tracing)
        self.tracing = Tracing(provider, owned=tracer_provider is None) if provider is not None else None
        self.registry = registry or default_registry(self.config)
        self._sessions: dict[str, Session] = {}
        self._manifests: collections.OrderedDict[Any, Manifest] = collections.OrderedDict()
        self._process_manager: Any = None
        self._wasm: Any = None
        self._ray: Any = None
        #: sessions started over the engine's life
        self.sessions_started = 0
        self._closed = False
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._opened = False
        #: called with False when node processes cannot be started (the zygote
        #: died), with True once they can again (the server's health follows it)
        self.on_serving: Callable[[bool], None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._opened = True
        if self.config.session.multiprocess_enabled:
            await self.process_manager().sweep()  # files of engines that crashed before this one
            if self.config.prewarming:
                await self.process_manager().prewarm()

    async def aclose(self) -> None:
        """Tear down every session, then the process pool."""
        if self._closed:
            return
        self._closed = True
        sessions = list(self._sessions.values())
        await asyncio.gather(*(s.cancel() for s in sessions), return_exceptions=True)
        if self._process_manager is not None:
            await self._process_manager.aclose()
            self._process_manager = None
        if self.tracing is not None:  # flushes what the exporter holds (a network call: off the loop)
            await asyncio.to_thread(self.tracing.shutdown)
        if self._wasm is not None:
            self._wasm.close()
            self._wasm = None
        if self._ray is not None:
            await self._ray.aclose()
            self._ray = None

    @property
    def accepting(self) -> bool:
        """False once the engine is closing or draining (it starts no new session)."""
        return self._accepting and not self._closed

    def stop_accepting(self) -> None:
        """Refuse new sessions (RESOURCE_LIMIT); running ones go on. For draining."""
        self._accepting = False

    async def wait_idle(self) -> None:
        """Wait until no session is running (bound it with asyncio.timeout)."""
        await self._idle.wait()

    @property
    def sessions(self) -> Mapping[str, Session]:
        return self._sessions

    @property
    def process_count(self) -> int:
        """Node processes alive now, across all sessions."""
        pm = self._process_manager
        return len(pm.live) if pm is not None else 0

    # ------------------------------------------------------------ manifests

    def validate(self, manifest: Any) -> Manifest:
        """Validate (or take from the cache) a manifest: dict, JSON, path, proto or Manifest.

        Clients send the same manifest again and again; a validated Manifest
        is immutable, so it is cached by its exact text/bytes (LRU). Only
        valid manifests are cached; a failing one is checked every time.
        """
        if isinstance(manifest, Manifest):
            return manifest
        key = _cache_key(manifest)
        if key is not None:
            hit = self._manifests.get(key)
            if hit is not None:
                self._manifests.move_to_end(key)
                return hit
        m = validate(manifest, self.registry)
        check_executors(m, self.config, self.registry, self.wasm_executor)
        if key is not None:
            self._manifests[key] = m
            if len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return m

    def plan(self, manifest: Any, limits: ClientLimits | None = None) -> tuple[Manifest, ExecutionPlan, Any]:
        m = self.validate(manifest)
        settings = self.config.for_manifest(dict(m.multiprocess))
        if limits is not None:
            settings = limits.apply(settings)
        plan = build_plan(m, self.registry, settings, self.config.ray if self.config.ray.address else None)
        n_proc = plan.count("multiprocess")
        if n_proc > settings.max_processes_per_session:
            raise ResourceLimitError(
                f"pipeline needs {n_proc} node processes but max_processes_per_session is "
                f"{settings.max_processes_per_session}",
                context={"field": "max_processes_per_session", "requested": n_proc,
                         "limit": settings.max_processes_per_session},
            )
        return m, plan, settings

    # ------------------------------------------------------------ sessions

    def stream(self, manifest: Any, *, on_progress: Callable[[InitProgress], Any] | None = None,
               session_id: str | None = None, limits: ClientLimits | None = None,
               output_sink: OutputSink | Callable[[Output], Awaitable[None]] | None = None,
               observer: Observer | None = None, trace_carrier: dict[str, str] | None = None) -> Session:
        """A streaming session; `async with` starts it (all nodes ready) and tears it down.

        `limits` (optional) tighten this run's memory, duration and audio
        frame size below what the configuration allows. With `output_sink`
        (a `session.OutputSink`, or an async callable), sink outputs go into it
        as they are produced (its waiting is the backpressure) instead of
        being queued for iteration; the
        session's end and error are then seen through `wait_closed()`/`error`.
        `observer` replaces the engine's observer for this session.
        `trace_carrier` (W3C `traceparent`/`tracestate`) continues a caller's trace.
        """
        if self._closed or not self._accepting:
            raise ResourceLimitError("engine is shutting down; not accepting sessions")
        m, plan, settings = self.plan(manifest, limits)
        if len(self._sessions) >= self.config.caps.max_sessions:
            raise ResourceLimitError(
                f"too many concurrent sessions (cap {self.config.caps.max_sessions})",
                context={"field": "max_sessions", "limit": self.config.caps.max_sessions},
            )
        n_proc = plan.count("multiprocess")
        if n_proc:
            self.process_manager().check_capacity(n_proc)
        session = Session(m, plan, settings, self._make_runner, on_progress=on_progress,
                          on_close=self._session_closed, session_id=session_id,
                          observer=observer if observer is not None else self.observer,
                          output_sink=output_sink, tracing=self.tracing, trace_carrier=trace_carrier)
        self._sessions[session.id] = session
        self.sessions_started += 1
        self._idle.clear()
        return session

    def _session_closed(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if not self._sessions:
            self._idle.set()

    def _make_runner(self, session: Session, planned: PlannedNode) -> NodeRunner:
        if planned.executor == "multiprocess":
            manager = self.process_manager()
            if not session.memory_watched:
                session.memory_watched = True
                session.track(manager.monitor_memory(session), "memory")
            return manager.runner(session, planned)
        if planned.executor == "wasm":
            return self.wasm_executor().runner(planned, session)
        if planned.executor == "ray":
            return self.ray_executor().runner(planned, session)
        if planned.executor == "remote":
            from .executors.remote import RemoteRunner

            return RemoteRunner(planned, session, self.config.remote, session.manifest.name)
        return NativeRunner(planned, session)

    def process_manager(self) -> Any:
        if self._process_manager is None:
            from .executors.process import ProcessManager

            self._process_manager = ProcessManager(self.config, self.registry)
            self._process_manager.on_serving = self._serving_changed
        return self._process_manager

    @property
    def serving(self) -> bool:
        """Whether a session needing node processes can start now."""
        pm = self._process_manager
        return pm is None or pm.serving

    def _serving_changed(self, serving: bool) -> None:
        if self.on_serving is not None:
            self.on_serving(serving)

    def ray_executor(self) -> Any:
        if self._ray is None:
            from .executors.ray_cluster import RayExecutor

            self._ray = RayExecutor(self.config.ray)
        return self._ray

    def wasm_executor(self) -> Any:
        if self._wasm is None:
            from .executors.wasm import WasmExecutor

            self._wasm = WasmExecutor(self.config.wasm)
        return self._wasm

    async def execute(self, manifest: Any, inputs: Mapping[str, RuntimeData], *,
                      on_progress: Callable[[InitProgress], Any] | None = None,
                      limits: ClientLimits | None = None,
                      on_output: Callable[[Output], Any] | None = None,
                      trace_carrier: dict[str, str] | None = None,
                      output_limit: OutputLimit | None = None,
                      session_id: str | None = None) -> ExecutionResult:
        """Batch mode: feed `inputs` (keyed by node id), run to completion.

        Every source node (one no connection feeds) that takes input must
        have one. Returns one value per sink: several outputs of one sink are
        joined (audio and text concatenated, JSON collected into a list; see
        data.concat); `all_outputs` keeps them separate. `on_output` sees
        each sink output as it comes. With `output_limit`, the output that
        takes the outputs past it fails the run at once (RESOURCE_LIMIT).
        `session_id` names the run's session (in its log records), as a
        server that logs the call under that id before the run starts needs.
        """
        t0 = time.perf_counter()
        m = self.validate(manifest)
        known = m.public_ids
        for node_id in inputs:
            if node_id not in known:
                raise ValidationError(f"input for unknown node {node_id!r}; nodes: {', '.join(sorted(known))}",
                                      node_id=node_id)
        inputs = {m.entry(k): v for k, v in inputs.items()}
        fed = {c.target for c in m.connections}
        starved = [n.id for n in m.nodes if n.id not in fed and n.input_types and n.id not in inputs]
        if starved:
            raise ValidationError([Issue("$.data_inputs", f"no input for source node {nid!r}: a batch run "
                                         "feeds the pipeline only through its inputs", node_id=nid,
                                         code="missing_input") for nid in starved])
        session = self.stream(m, on_progress=on_progress, limits=limits, trace_carrier=trace_carrier,
                              session_id=session_id)
        collected: dict[str, list[RuntimeData]] = collections.defaultdict(list)
        counted = _OutputBytes(output_limit) if output_limit is not None else None

        async def collect() -> None:
            try:
                async for out in session:
                    if counted is not None:
                        counted.add(out)
                    collected[out.node_id].append(out.data)
                    if on_output is not None:
                        on_output(out)
            except EngineError as err:
                if session.error is None:
                    # stop at once: the error is the run's, what is queued or still
                    # being computed is dropped (a sender waiting for room goes on)
                    session.fail_soon(err)
                    await session.cancel()
                raise

        async with session:
            t_ready = time.perf_counter()
            collector = asyncio.get_running_loop().create_task(collect())
            try:
                for node_id, data in inputs.items():
                    await session.send(node_id, data)
                await session.close()
                await collector
            finally:
                if not collector.done():
                    collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)  # its error is the session's
            await session.wait_closed()
        outputs = {nid: concat(frames) for nid, frames in collected.items()}
        snap = session.snapshot()
        snap["wall_time_ms"] = (time.perf_counter() - t0) * 1000
        snap["startup_ms"] = (t_ready - t0) * 1000
        return ExecutionResult(outputs, dict(collected), snap)
