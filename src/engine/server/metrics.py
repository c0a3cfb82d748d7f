"""Prometheus metrics of a serving engine, on their own registry.

Gauges are read at scrape time from the engine itself (no counters to keep
in step); counters and histograms are fed by the servicers and, per node
and per voice turn, through the session `Observer` hooks. Labels are
bounded: node *types* and error types, never client-chosen ids.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..turn_log import TurnReport

log = logging.getLogger("engine.server")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: a voice reply's first audio: 0.1-5 s is where turns land (under 0.5 s feels immediate,
#: over 1.5 s slow), finer where a change is felt
_TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_sessions = Gauge("remotemedia_active_sessions", "Sessions running now", registry=r)
        self.node_processes = Gauge("remotemedia_node_processes", "Node processes alive now", registry=r)
        self.sessions = Counter("remotemedia_sessions", "Sessions started", ["rpc"], registry=r)
        self.chunks = Counter("remotemedia_chunks", "Input chunks received by streams", registry=r)
        self.results = Counter("remotemedia_results", "Results sent to clients", registry=r)
        self.errors = Counter("remotemedia_errors", "Errors answered to clients", ["error_type"], registry=r)
        self.chunk_latency = Histogram(
            "remotemedia_chunk_latency_seconds",
            "Per chunk, streams: input chunk received → each result it caused sent (one observation "
            "per result; for a voice turn's latency see remotemedia_turn_latency_seconds)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.turn_latency = Histogram(
            "remotemedia_turn_latency_seconds",
            "Voice turns: end of the user's speech → the reply's first audio out of the session "
            "(one observation per committed turn that got a reply)",
            buckets=_TURN_BUCKETS, registry=r)
        self.execute_latency = Histogram(
            "remotemedia_execute_latency_seconds", "ExecutePipeline: request received → response ready",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.node_latency = Histogram(
            "remotemedia_node_output_latency_seconds",
            "Input entered the session → a node emitted an output for it, by node type",
            ["node_type"], buckets=_LATENCY_BUCKETS, registry=r)
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def bind(self, engine: Any) -> None:
        """Read the live gauges from this engine at scrape time."""
        self.active_sessions.set_function(lambda: len(engine.sessions))
        self.node_processes.set_function(lambda: engine.process_count)

    # the session Observer hooks
    def node_output(self, node_type: str, latency_s: float) -> None:
        self.node_latency.labels(node_type).observe(latency_s)

    def turn_ended(self, report: TurnReport) -> None:
        if report.first_audio_ms is not None:
            self.turn_latency.observe(report.first_audio_ms / 1000)

    def error(self, error_type: str) -> None:
        self.errors.labels(error_type).inc()

    # ------------------------------------------------------------ HTTP

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
