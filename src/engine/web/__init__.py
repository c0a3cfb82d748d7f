"""The browser face: a page to talk to a voice pipeline, WebRTC media (aiortc)
and the HTTP signalling that sets it up (aiohttp).

`serve --http-port P` (runtime.toml `[http] port`) serves, on the gRPC host:

- `GET /`: the page (plain HTML and JavaScript, no build step);
- `POST /api/offer`: `{"sdp", "type", "pipeline"?}` → `{"sdp", "type", "pc_id"}`,
  one peer connection and one session of the named pipeline (`[http]
  pipelines`; a client never sends a manifest or code here).

Each peer's microphone track is decoded (Opus, by aiortc) and resampled once
(soxr) into the pipeline's audio source; the pipeline's reply audio goes back
as an audio track paced by the RTP clock, so the browser's jitter buffer is
the only playout buffer; a data channel carries JSON events (transcript,
reply text, interrupted, turn timings, errors). Like the gRPC face, it turns
its wire into RuntimeData and back at its edge; nothing below knows a
session came from a browser.
"""

from .http import HttpFace

__all__ = ["HttpFace"]
