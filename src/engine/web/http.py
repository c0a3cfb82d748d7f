"""The HTTP side of the browser face (aiohttp): the page and WebRTC signalling.

`POST /api/offer` takes `{"sdp", "type": "offer", "pipeline"?}` and answers
`{"sdp", "type": "answer", "pc_id"}` (the convention of Pipecat's small
WebRTC clients); the answer carries every ICE candidate (no trickle). A bad
offer is a 400 with one line saying why, a full server a 503; neither
leaves a session behind.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any

import orjson

from ..errors import EngineError, ResourceLimitError
from ..turns import TurnEvent
from . import ice
from .peer import VoicePeer

log = logging.getLogger("engine.web")


class _Observer:
    """The engine's observer for a session, plus the peer's turn events."""

    def __init__(self, base: Any, peer_ref: list[VoicePeer]) -> None:
        self.base, self.peer_ref = base, peer_ref

    def node_output(self, node_type: str, latency_s: float) -> None:
        if self.base is not None:
            self.base.node_output(node_type, latency_s)

    def turn_event(self, event: TurnEvent) -> None:
        if self.peer_ref:
            self.peer_ref[0].turn_event(event)
        hook = getattr(self.base, "turn_event", None)
        if hook is not None:
            hook(event)

    def turn_ended(self, report: Any) -> None:
        hook = getattr(self.base, "turn_ended", None)
        if hook is not None:
            hook(report)


class BadOffer(ValueError):
    """An offer the server cannot take (HTTP 400)."""


class HttpFace:
    """Serves the page and `/api/offer` for `engine` on host:port."""

    def __init__(self, engine: Any, settings: Any, host: str, port: int) -> None:
        self.engine = engine
        self.settings = settings
        self.host, self.port = host, port
        self.bound_port = 0
        self.peers: dict[str, VoicePeer] = {}
        self._runner: Any = None
        self._manifests: dict[str, Any] = {}
        self._page_html = ""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        from aiohttp import web

        for name, source in self.settings.pipelines.items():  # checked at start, not at the first call
            self._manifests[name] = self.engine.validate(_manifest_source(source))
        self._page_html = resources.files("engine.web").joinpath("page.html").read_text()
        ice.offer_addresses(self.host)
        app = web.Application(client_max_size=self.settings.max_offer_bytes)
        app.router.add_get("/", self._page)
        app.router.add_post("/api/offer", self._offer)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=False)
        await site.start()
        self.bound_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("page and WebRTC signalling on http://%s:%d/", self.host, self.bound_port)
        return self.bound_port

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose("the server is stopping") for p in list(self.peers.values())),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def forget(self, peer: VoicePeer) -> None:
        self.peers.pop(peer.id, None)

    # ------------------------------------------------------------ routes

    async def _page(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text=self._page_html, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _offer(self, request: Any) -> Any:
        from aiohttp import web

        try:
            sdp, name = await self._read_offer(request)
        except BadOffer as exc:
            return web.Response(status=400, text=f"{exc}\n")
        manifest = self._manifests[name]
        peer_ref: list[VoicePeer] = []
        try:
            session = self.engine.stream(manifest, observer=_Observer(self.engine.observer, peer_ref))
        except ResourceLimitError as exc:
            return web.Response(status=503, text=f"{exc.message}\n")
        source = self.settings.source_node or manifest.nodes[0].public_id
        peer = VoicePeer(self, session, source, self.settings.sample_rate, self.settings.chunk_samples,
                         self.settings.idle_secs, self.settings.jitter_prefetch_packets)
        peer_ref.append(peer)
        try:
            await session.start()
            answer = await peer.answer(sdp, "offer")
        except ValueError as exc:  # aiortc's word on an SDP it cannot parse or use
            await peer.aclose(f"bad offer: {exc}")
            return web.Response(status=400, text=f"bad offer: {exc}\n")
        except EngineError as exc:
            await peer.aclose(f"the pipeline did not start: {exc}")
            return web.Response(status=503 if isinstance(exc, ResourceLimitError) else 500, text=f"{exc}\n")
        except BaseException:
            await peer.aclose("the offer failed")
            raise
        self.peers[peer.id] = peer
        log.info("peer %s: session %s (%s)", peer.id, session.id, name)
        return web.json_response(answer)

    async def _read_offer(self, request: Any) -> tuple[str, str]:
        from aiohttp import web

        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadOffer(f"the offer is larger than {self.settings.max_offer_bytes} bytes") from None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadOffer(f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadOffer('the body must be a JSON object {"sdp", "type"}')
        sdp, kind = doc.get("sdp"), doc.get("type")
        if kind != "offer":
            raise BadOffer(f'"type" must be "offer", not {kind!r}')
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise BadOffer('"sdp" must be an SDP offer (text starting "v=0")')
        from aiortc.sdp import SessionDescription

        try:
            parsed = SessionDescription.parse(sdp)
        except Exception as exc:  # aiortc's parser raises whatever the text trips it on
            raise BadOffer(f"the SDP does not parse: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
        if not any(m.kind == "audio" for m in parsed.media):
            raise BadOffer("the offer has no audio (m=audio): the page needs the microphone")
        name = doc.get("pipeline") or self.settings.default_pipeline
        if name not in self._manifests:
            raise BadOffer(f"unknown pipeline {name!r}; this server has {', '.join(sorted(self._manifests))}")
        return sdp, name


def _manifest_source(source: str) -> Any:
    """A configured pipeline: a manifest file's path, or `builtin:NAME` for one the engine ships."""
    if source.startswith("builtin:"):
        return resources.files("engine.web").joinpath(f"{source.removeprefix('builtin:')}.json").read_text()
    return source
