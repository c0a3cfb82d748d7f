"""Talk to the voice loop over gRPC: send a WAV in real time, save the spoken reply.

    make run                                                   # the server
    .venv/bin/python -m nodes.speech.spoken "What is the capital of France?" question.wav
    .venv/bin/python examples/voice_client.py question.wav reply.wav [--address 127.0.0.1:50051]

The WAV must be 16 kHz mono (what examples/speech_to_speech.json expects).
Audio goes out as 32 ms chunks at the pace of real speech, followed by
silence until the reply has played, as a microphone would. Reply audio comes
in 100 ms frames tagged with `turn_id`; the first frame of each phrase
carries its `text`. If the user talks over a reply, the server sends a JSON
buffer `{"event": "interrupted", "turn_id": ..., "played_ms": ...}` on the
`tts` output: a player drops what it still holds of that turn.

At the end it prints what it measured: the transcript, the reply, and the
time from the end of speech in the file to the first reply audio.
"""

import argparse
import json
import sys
import threading
import time
import wave
from pathlib import Path

import grpc
import numpy as np

from engine._proto import common_pb2 as pb
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc
from engine.manifest_proto import to_proto

CHUNK = 512  # samples at 16 kHz = 32 ms
MANIFEST = Path(__file__).resolve().parent / "speech_to_speech.json"


def read_question(path: str) -> np.ndarray:
    try:
        with wave.open(path, "rb") as w:
            if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
                sys.exit(f"{path}: need 16 kHz mono 16-bit PCM (try: ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)")
            return np.frombuffer(w.readframes(w.getnframes()), "<i2")
    except (OSError, EOFError, wave.Error) as exc:
        sys.exit(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}")


def speech_end(samples: np.ndarray) -> int:
    """Index just after the last 32 ms chunk louder than -40 dBFS (the end of speech)."""
    n = samples.size // CHUNK
    rms = np.sqrt(np.mean(samples[:n * CHUNK].reshape(n, CHUNK).astype(np.float64) ** 2, axis=1)) / 32768
    loud = np.flatnonzero(rms > 0.01)
    return int((loud[-1] + 1) * CHUNK) if loud.size else samples.size


class Call:
    """One conversation: a request thread that talks in real time, the replies as they come."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = samples
        self.end_index = speech_end(samples)
        self.ready = threading.Event()
        self.finished = threading.Event()  # set when the call ends, whatever the reason
        self.played_until = 0.0  # when the reply received so far has played (real time)
        self.speech_ended_at: float | None = None
        self.first_audio_at: float | None = None
        self.transcript = ""
        self.reply: list[str] = []
        self.audio: list[np.ndarray] = []
        self.rate = 22050
        self.error: Exception | None = None  # raised while sending

    def requests(self):
        # gRPC reports an exception raised here only as "Exception iterating
        # requests!": keep it, so that the real cause is what gets printed
        try:
            yield from self._requests()
        except Exception as exc:
            self.error = exc
            raise

    def _requests(self):
        yield spb.StreamRequest(init=spb.StreamInit(manifest=to_proto(str(MANIFEST))))
        while not self.ready.wait(0.1):
            if self.finished.is_set():
                return
        start = time.perf_counter()
        seq, silence, total = 0, np.zeros(CHUNK, "<i2"), self.samples.size
        while not self.finished.is_set():
            i = seq * CHUNK
            spoken_out = i >= total
            if spoken_out and time.perf_counter() > max(self.played_until, start + total / 16000 + 1.0) + 0.5:
                break  # said everything, and the reply (if any) has played
            time.sleep(max(0.0, start + (seq + 1) * CHUNK / 16000 - time.perf_counter()))
            part = silence if spoken_out else self.samples[i:i + CHUNK]
            buf = pb.DataBuffer(audio=pb.AudioBuffer(samples=part.tobytes(), sample_rate=16000, channels=1,
                                                     format=pb.AUDIO_FORMAT_I16, num_samples=part.size))
            yield spb.StreamRequest(data_chunk=spb.DataChunk(node_id="vad", buffer=buf, sequence=seq))
            if self.speech_ended_at is None and i + CHUNK >= self.end_index:
                self.speech_ended_at = time.perf_counter()
            seq += 1
        yield spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))

    def on_result(self, out: pb.DataBuffer) -> None:
        if out.WhichOneof("data_type") == "json":  # {"event": "interrupted", ...}
            print(f"  event: {json.loads(out.json.json_payload)}")
            return
        audio = out.audio
        now = time.perf_counter()
        if self.first_audio_at is None:
            self.first_audio_at = now
        self.rate = audio.sample_rate
        self.audio.append(np.frombuffer(audio.samples, "<f4"))
        self.played_until = max(self.played_until, now) + audio.num_samples / self.rate
        if "text" in out.metadata:
            self.transcript = out.metadata.get("transcript", self.transcript)
            self.reply.append(out.metadata["text"])
            print(f"  reply (turn {out.metadata.get('turn_id')}): {out.metadata['text']!r}")


def talk(address: str, call: Call) -> None:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
        except grpc.FutureTimeoutError:
            sys.exit(f"no server at {address} (start one with `make run`)")
        stub = streaming_pb2_grpc.StreamingPipelineServiceStub(channel)
        try:
            for resp in stub.StreamPipeline(call.requests()):
                kind = resp.WhichOneof("response")
                if kind == "init_progress":
                    p = resp.init_progress
                    print(f"  {p.node_id}: {p.phase} {p.percent:.0f}% {p.message}")
                elif kind == "ready":
                    print(f"session {resp.ready.session_id} ready; speaking…")
                    call.ready.set()
                elif kind == "result":
                    call.on_result(resp.result.data_outputs["tts"])
                elif kind == "error":
                    sys.exit(f"error {pb.ErrorType.Name(resp.error.error_type)} in "
                             f"{resp.error.failing_node_id or 'the pipeline'}: {resp.error.message}")
                elif kind == "closed":
                    print(f"closed: {resp.closed.reason}")
        except grpc.RpcError as exc:
            if call.error is not None:
                sys.exit(f"error while sending: {type(call.error).__name__}: {call.error}")
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                sys.exit(f"lost the server at {address}: {exc.details()}")
            sys.exit(f"error: {exc.code().name}: {exc.details()}")
        finally:
            call.finished.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", help="16 kHz mono 16-bit WAV with what to say")
    parser.add_argument("reply", help="where to write the spoken reply (WAV)")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server (default: %(default)s)")
    args = parser.parse_args()
    call = Call(read_question(args.question))
    talk(args.address, call)
    if not call.audio:
        sys.exit("no reply (was there speech in the file?)")
    pcm = (np.clip(np.concatenate(call.audio), -1, 1) * 32767).astype("<i2")
    with wave.open(args.reply, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(call.rate)
        w.writeframes(pcm.tobytes())
    print(f"wrote {args.reply}: {pcm.size / call.rate:.2f} s at {call.rate} Hz")
    print(f"heard: {call.transcript!r}")
    print(f"reply: {' '.join(call.reply)!r}")
    if call.speech_ended_at is not None and call.first_audio_at is not None:
        print(f"end of speech → first reply audio: {(call.first_audio_at - call.speech_ended_at) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
