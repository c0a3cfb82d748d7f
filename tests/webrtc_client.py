"""A WebRTC voice client without a browser (aiortc), and a runner that puts a
server and this client in a network namespace of their own with only
loopback up, so no ICE traffic can leave 127.0.0.1.

    python tests/webrtc_client.py SCENARIO   (inside the namespace; prints JSON)

Used by tests/test_webrtc.py through `in_loopback_netns()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RATE = 48_000
FRAME = 960


def in_loopback_netns(*args: str, timeout_s: float = 240) -> dict:
    """Run this script with `args` in a new network namespace (only `lo`, up); its JSON."""
    cmd = ["unshare", "--net", "--", "sh", "-c",
           f'ip link set lo up && exec "{sys.executable}" "{__file__}" "$@"', "sh", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_microphone(audio48k: np.ndarray, *, paced: bool = True, frame: int = FRAME) -> Any:
    """A track that plays `audio48k` (float32 mono) in real time, then silence, like a microphone;
    not `paced`: as fast as the sender takes it, in frames of `frame` samples."""
    from aiortc import MediaStreamTrack
    from av import AudioFrame

    class Microphone(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.pcm = (np.clip(audio48k, -1, 1) * 32767).astype(np.int16)
            self.pts = 0
            self.start: float | None = None
            self.speech_end_at: float | None = None  # monotonic time its last sample was sent

        async def recv(self) -> Any:
            if self.start is None:
                self.start = time.monotonic()
            wait = self.start + self.pts / RATE - time.monotonic()
            if wait > 0 and paced:
                await asyncio.sleep(wait)
            elif not paced:
                await asyncio.sleep(0)
            piece = self.pcm[self.pts:self.pts + frame]
            if piece.size < frame:
                if self.speech_end_at is None:
                    self.speech_end_at = time.monotonic()
                piece = np.concatenate((piece, np.zeros(frame - piece.size, np.int16)))
            out = AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
            out.sample_rate, out.pts, out.time_base = RATE, self.pts, fractions.Fraction(1, RATE)
            self.pts += frame
            return out

    return Microphone()


class VoiceClient:
    """One conversation with the server's /api/offer: a microphone in, reply audio and events out."""

    def __init__(self, url: str, audio48k: np.ndarray, **mic: Any) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url = url
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = make_microphone(audio48k, **mic)
        self.events: list[dict] = []
        self.reply: list[np.ndarray] = []
        self.reply_times: list[float] = []
        self._reader: asyncio.Task | None = None
        self.pc_id = ""

    async def connect(self, **offer_extra: Any) -> None:
        import aiohttp
        from aiortc import RTCSessionDescription

        self.pc.addTrack(self.mic)
        channel = self.pc.createDataChannel("events")
        channel.on("message", lambda m: self.events.append(json.loads(m)))

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self._reader = asyncio.get_running_loop().create_task(self._read(track))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            body = {"sdp": self.pc.localDescription.sdp, "type": "offer", **offer_extra}
            async with http.post(f"{self.url}/api/offer", json=body) as res:
                if res.status != 200:
                    raise RuntimeError(f"{res.status}: {await res.text()}")
                answer = await res.json()
        self.pc_id = answer["pc_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def _read(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                x = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768
                self.reply.append(x.astype(np.float32))
                self.reply_times.append(time.monotonic())

    def loud_at(self, after: float) -> float | None:
        """When reply audio above −40 dBFS first arrived after `after` (monotonic)."""
        for t, x in zip(self.reply_times, self.reply, strict=False):
            if t >= after and x.size and float(np.abs(x).max()) > 0.01:
                return t
        return None

    def selected_pair(self) -> tuple[str, str]:
        """(local, remote) address of the nominated ICE candidate pair."""
        transport = self.pc.getTransceivers()[0].receiver.transport.transport
        pair = next(iter(transport._connection._nominated.values()))  # aioice keeps no public accessor
        return pair.local_candidate.host, pair.remote_candidate.host

    async def aclose(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def until(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---------------------------------------------------------------- scenarios (inside the namespace)

async def _server(**http: Any) -> Any:
    return await _server_with({"http": http})


async def _server_with(config: dict) -> Any:
    from engine.server import EngineServer

    # a port of our own: in this namespace nothing else listens
    srv = EngineServer({"ipc_root": "/tmp/remotemedia-engine-test", **config},
                       host="127.0.0.1", port=0, http_port=_free_port())
    await srv.start()
    return srv


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_answer() -> dict:
    """The test's own models, loaded before the leak snapshot: they are not the server's."""
    from speech_audio import espeak

    from nodes.speech.whisper import WhisperNode

    checker = WhisperNode("check", {"window_s": 30})
    checker.initialize()
    return {"checker": checker, "question": espeak("What is the capital of France?", RATE, wpm=150, tail_s=2.0)}


async def answer(checker: Any, question: np.ndarray) -> dict:
    """A spoken question in, a spoken reply out; the session gone once the client leaves."""
    import soxr

    q = question
    srv = await _server()
    out: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{srv.http.bound_port}"
        client = VoiceClient(url, q)
        await client.connect()
        await until(lambda: any(e["type"] == "timing" for e in client.events), 60)
        await until(lambda: client.mic.speech_end_at is not None, 10)
        await asyncio.sleep(2.0)  # the reply plays on
        out["pair"] = client.selected_pair()
        out["events"] = client.events
        audio = np.concatenate(client.reply) if client.reply else np.zeros(0, np.float32)
        out["reply_peak"] = float(np.abs(audio).max()) if audio.size else 0.0
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        speech = audio[loud[0]:loud[-1] + 1] if loud.size else audio
        out["reply_heard"] = checker.transcribe(soxr.resample(speech, RATE, 16000).astype(np.float32))[0]
        await client.aclose()
        out["peers_left"] = await until(lambda: not srv.http.peers, 10)
        out["sessions_left"] = await until(lambda: not srv.engine.sessions, 10)
    finally:
        await srv.aclose()
    return out


async def bad_offers() -> dict:
    """Offers the server must refuse with a 400, leaving nothing."""
    import aiohttp

    srv = await _server()
    url = f"http://127.0.0.1:{srv.http.bound_port}/api/offer"
    cases = {
        "not json": b"{sdp",
        "no sdp": json.dumps({"type": "offer"}).encode(),
        "truncated sdp": json.dumps({"sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\nm=audio", "type": "offer"}).encode(),
        "no audio": json.dumps({"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "type": "offer"}).encode(),
        "unknown pipeline": json.dumps({"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer",
                                        "pipeline": "../../etc/passwd"}).encode(),
        "huge": b'{"sdp": "' + b"v" * 200_000 + b'", "type": "offer"}',
    }
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for name, body in cases.items():
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as res:
                    out[name] = [res.status, (await res.text()).strip()]
        out["sessions"] = len(srv.engine.sessions)
    finally:
        await srv.aclose()
    return out


async def gone_silent() -> dict:
    """A client whose network goes without a word (a closed tab): its session ends."""
    srv = await _server(idle_secs=1.5)
    out: dict[str, Any] = {}
    try:
        client = VoiceClient(f"http://127.0.0.1:{srv.http.bound_port}", np.zeros(RATE, np.float32))
        await client.connect()
        await until(lambda: client.pc.connectionState == "connected", 10)
        await asyncio.sleep(0.5)  # audio flows
        # the network gone, as a closed tab or a dropped Wi-Fi leaves it: the client's
        # sockets close without a word to the server (no BYE, no DTLS close alert)
        ice = client.pc.getTransceivers()[0].sender.transport.transport
        for protocol in ice._connection._protocols:  # aioice keeps no public handle on its sockets
            protocol.transport.close()
        t0 = time.monotonic()
        out["ended"] = await until(lambda: not srv.engine.sessions and not srv.http.peers, 10)
        out["ended_after_s"] = round(time.monotonic() - t0, 2)
        await client.aclose()
    finally:
        await srv.aclose()
    return out


async def flood() -> dict:
    """A client that sends audio as fast as it can, in odd frame sizes: the server holds a
    bounded amount, keeps running, and its session ends cleanly."""
    import psutil

    srv = await _server()
    out: dict[str, Any] = {}
    try:
        noise = np.random.default_rng(1).normal(0, 0.1, RATE * 60).astype(np.float32)
        client = VoiceClient(f"http://127.0.0.1:{srv.http.bound_port}", noise, paced=False, frame=333)
        await client.connect()
        await until(lambda: client.pc.connectionState == "connected", 10)
        rss0, pts0 = psutil.Process().memory_info().rss, client.mic.pts
        await asyncio.sleep(6)
        out["sent_x_real_time"] = round((client.mic.pts - pts0) / RATE / 6, 1)
        out["rss_growth_mb"] = (psutil.Process().memory_info().rss - rss0) / 2**20
        peer = next(iter(srv.http.peers.values()), None)
        out["alive"] = peer is not None and bool(srv.engine.sessions)
        out["dropped"] = peer.dropped_frames if peer is not None else -1
        await client.aclose()
        out["ended"] = await until(lambda: not srv.engine.sessions and not srv.http.peers, 10)
    finally:
        await srv.aclose()
    return out


async def full() -> dict:
    """More offers than caps.max_sessions: a 503 with the reason, and nothing started for it."""
    srv = await _server_with({"caps": {"max_sessions": 1}})
    out: dict[str, Any] = {}
    try:
        first = VoiceClient(f"http://127.0.0.1:{srv.http.bound_port}", np.zeros(RATE, np.float32))
        await first.connect()
        second = VoiceClient(f"http://127.0.0.1:{srv.http.bound_port}", np.zeros(RATE, np.float32))
        try:
            await second.connect()
            out["second"] = "accepted"
        except RuntimeError as exc:
            out["second"] = str(exc)
        out["sessions"] = len(srv.engine.sessions)
        await second.aclose()
        await first.aclose()
        out["ended"] = await until(lambda: not srv.engine.sessions and not srv.http.peers, 10)
    finally:
        await srv.aclose()
    return out


CHROMIUM = "/usr/bin/chromium"


def fake_microphone_wav(path: Path, *parts: tuple[str, float], lead_s: float = 6.0) -> Path:
    """A WAV for Chromium's fake microphone: each (text, pause after it in s) spoken by
    espeak-ng, after `lead_s` of silence (the file starts playing when the page opens the
    microphone, seconds before the connection is up); 48 kHz 16-bit mono."""
    import soundfile
    from speech_audio import espeak

    pieces = [np.zeros(int(lead_s * RATE), np.float32)]
    for text, pause in parts:
        pieces.append(espeak(text, RATE, wpm=150, lead_s=0.0, tail_s=pause))
    soundfile.write(path, np.concatenate(pieces), RATE, subtype="PCM_16")
    return path


async def open_page(url: str, wav: Path) -> tuple[Any, Any, Any]:
    """Headless Chromium (Debian's) on `url` with `wav` as its microphone: (playwright, browser, page)."""
    from playwright.async_api import async_playwright

    pw = await async_playwright().start()
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
        # candidates on 127.0.0.1 as they are, not hidden behind mDNS names
        "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"])
    page = await browser.new_page()
    await page.goto(url)
    return pw, browser, page


async def page_events(page: Any) -> list[dict]:
    return await page.evaluate("window.rme.events")


async def browser(shot: str = "") -> dict:
    """The page in Chromium: a spoken question answered (transcript, reply, latency shown), then
    a second question spoken over the reply interrupts it; a reload ends the old session."""
    import tempfile

    srv = await _server()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = fake_microphone_wav(Path(tmp) / "mic.wav", ("What is the capital of France?", 3.0),
                                  ("Tell me a long story about a dragon and a knight.", 0.3),
                                  ("What color is the sky?", 6.0))
        pw, chromium, page = await open_page(f"http://127.0.0.1:{srv.http.bound_port}/", wav)
        try:
            await page.click("#talk")
            await page.wait_for_function("window.rme.events.some(e => e.type === 'timing')", timeout=60_000)
            await page.wait_for_function("[...window.rme.turns.values()].some(t => t.heard_ms !== undefined)",
                                         timeout=30_000)
            peer = next(iter(srv.http.peers.values()))
            ice = peer.pc.getTransceivers()[0].receiver.transport.transport
            pair = next(iter(ice._connection._nominated.values()))  # aioice keeps no public accessor
            out["pair"] = [pair.local_candidate.host, pair.remote_candidate.host]
            await page.wait_for_function("window.rme.events.some(e => e.type === 'interrupted')", timeout=60_000)
            await page.wait_for_timeout(1500)
            if shot:
                await page.screenshot(path=shot, full_page=True)
            out["events"] = await page_events(page)
            out["turns"] = await page.evaluate("Object.fromEntries(window.rme.turns)")
            out["page_text"] = await page.inner_text("#log")
            out["error_shown"] = await page.is_visible("#error")
            old = set(srv.engine.sessions)
            await page.reload()
            out["old_session_gone"] = await until(lambda: not (old & set(srv.engine.sessions)), 10)
        finally:
            await chromium.close()
            await pw.stop()
    out["sessions_left"] = await until(lambda: not srv.engine.sessions, 10)
    await srv.aclose()
    return out


async def bench(questions_json: str, barge_json: str) -> dict:
    """The bench's run (bench/scenarios_browser.py): each question, then silence while the
    reply plays; then barge-ins (a question, and another spoken over its reply); then the
    idle cost of a connected session."""
    import tempfile

    import psutil

    questions, barge = json.loads(questions_json), json.loads(barge_json)
    srv = await _server()
    out: dict[str, Any] = {}
    parts = [(q, 7.0) for q in questions]
    for a, b in barge:
        parts += [(a, 1.1), (b, 7.0)]
    with tempfile.TemporaryDirectory() as tmp:
        wav = fake_microphone_wav(Path(tmp) / "mic.wav", *parts)
        import soundfile

        total_s = soundfile.info(str(wav)).duration
        pw, chromium, page = await open_page(f"http://127.0.0.1:{srv.http.bound_port}/", wav)
        try:
            await page.click("#talk")
            await page.wait_for_function("window.rme.events.some(e => e.type === 'transcript')", timeout=60_000)
            await asyncio.sleep(total_s + 2)
            out["events"] = await page_events(page)
            out["turns"] = await page.evaluate("Object.fromEntries(window.rme.turns)")
            out["onsets"] = await page.evaluate("window.rme.onsets")
            out["silences"] = await page.evaluate("window.rme.silences")
            me = psutil.Process()
            browser_side = {p.pid for c in me.children() if "playwright" in " ".join(c.cmdline())
                            for p in (c, *c.children(recursive=True))}  # Playwright's driver and Chromium
            procs = [p for p in (me, *me.children(recursive=True)) if p.pid not in browser_side]
            t0 = [sum(p.cpu_times()[:2]) for p in procs]
            await asyncio.sleep(10)  # nobody speaks; the microphone stays open
            t1 = [sum(p.cpu_times()[:2]) for p in procs]
            out["idle_core_share"] = (sum(t1) - sum(t0)) / 10
        finally:
            await chromium.close()
            await pw.stop()
    await srv.aclose()
    return out


async def _first_site() -> None:
    """The process's first aiohttp site opens /dev/null and keeps it (once, whatever comes after):
    opened here, before the leak snapshot."""
    from aiohttp import web

    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await runner.cleanup()


async def _main(name: str) -> dict:
    """One scenario, its leaks counted around it (the test's own set-up before the snapshot)."""
    import gc

    import leakprobe
    from speech_audio import spoken

    from engine.server import process

    process.fixed_executor(asyncio.get_running_loop())  # as `serve` does: its threads exist from the start
    spoken("Hello.")  # onnxruntime's first session keeps a cache database open for the process's life
    await _first_site()
    prepared = {"answer": prepare_answer}.get(name, dict)()
    before = leakprobe.snapshot()
    scenarios = {"answer": answer, "bad_offers": bad_offers, "gone_silent": gone_silent, "browser": browser,
                 "bench": bench, "flood": flood, "full": full}
    out = await scenarios[name](*sys.argv[2:], **prepared)
    gc.collect()  # the scenario's client and server objects (an Opus codec holds threads) are gone
    out["leaks"] = leakprobe.leaks(before)
    return out


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(_main(sys.argv[1])), default=sorted))
