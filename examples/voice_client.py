"""Talk to the voice loop over gRPC: send a WAV in real time, save the spoken reply.

    make run                                                   # the server
    .venv/bin/python -m nodes.speech.spoken "What is the capital of France?" question.wav
    .venv/bin/python examples/voice_client.py question.wav reply.wav [127.0.0.1:50051]

The WAV must be 16 kHz mono (what examples/speech_to_speech.json expects).
Audio goes out as 32 ms chunks at the pace of real speech, followed by
silence until the reply has played, as a microphone would. Reply audio comes
in 100 ms frames tagged with `turn_id`; the first frame of each phrase
carries its `text`. If the user talks over a reply, the server sends a JSON
buffer `{"event": "interrupted", "turn_id": ..., "played_ms": ...}` on the
`tts` output: a player drops what it still holds of that turn.
"""

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
from engine.manifest import to_proto

CHUNK = 512  # samples at 16 kHz = 32 ms


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    address = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:50051"
    with wave.open(src, "rb") as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            sys.exit(f"{src}: need 16 kHz mono 16-bit PCM")
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    ready = threading.Event()
    played_until = {"t": 0.0}  # when the reply received so far has played (real time)

    def requests():
        manifest = Path(__file__).resolve().parent / "speech_to_speech.json"
        yield spb.StreamRequest(init=spb.StreamInit(manifest=to_proto(str(manifest))))
        ready.wait()
        start = time.perf_counter()
        seq, silence = 0, np.zeros(CHUNK, "<i2")
        while True:
            i = seq * CHUNK
            spoken_out = i >= samples.size
            if spoken_out and time.perf_counter() > max(played_until["t"], start + samples.size / 16000 + 1.0) + 0.5:
                break  # said everything, and the reply (if any) has played
            time.sleep(max(0.0, start + (seq + 1) * CHUNK / 16000 - time.perf_counter()))
            part = silence if spoken_out else samples[i:i + CHUNK]
            buf = pb.DataBuffer(audio=pb.AudioBuffer(samples=part.tobytes(), sample_rate=16000, channels=1,
                                                     format=pb.AUDIO_FORMAT_I16, num_samples=part.size))
            yield spb.StreamRequest(data_chunk=spb.DataChunk(node_id="vad", buffer=buf, sequence=seq))
            seq += 1
        yield spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))

    reply, rate = [], 22050
    with grpc.insecure_channel(address) as channel:
        stub = streaming_pb2_grpc.StreamingPipelineServiceStub(channel)
        for resp in stub.StreamPipeline(requests()):
            kind = resp.WhichOneof("response")
            if kind == "init_progress":
                p = resp.init_progress
                print(f"  {p.node_id}: {p.phase} {p.percent:.0f}% {p.message}")
            elif kind == "ready":
                print(f"session {resp.ready.session_id} ready; speaking…")
                ready.set()
            elif kind == "result":
                out = resp.result.data_outputs["tts"]
                if out.WhichOneof("data_type") == "json":  # {"event": "interrupted", ...}
                    print(f"  event: {json.loads(out.json.json_payload)}")
                    continue
                audio = out.audio
                rate = audio.sample_rate
                reply.append(np.frombuffer(audio.samples, "<f4"))
                now = time.perf_counter()
                played_until["t"] = max(played_until["t"], now) + audio.num_samples / rate
                if "text" in out.metadata:
                    print(f"  reply (turn {out.metadata.get('turn_id')}): {out.metadata['text']!r} "
                          f"(heard: {out.metadata.get('transcript')!r})")
            elif kind == "error":
                ready.set()
                sys.exit(f"error {pb.ErrorType.Name(resp.error.error_type)} in {resp.error.failing_node_id}: "
                         f"{resp.error.message}")
            elif kind == "closed":
                print(f"closed: {resp.closed.reason}")
    if not reply:
        sys.exit("no reply (was there speech in the file?)")
    pcm = (np.clip(np.concatenate(reply), -1, 1) * 32767).astype("<i2")
    with wave.open(dst, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    print(f"wrote {dst}: {pcm.size / rate:.2f} s at {rate} Hz")


if __name__ == "__main__":
    main()
