"""Talk to the voice loop over gRPC: send a WAV in real time, save the spoken reply.

    make run                                                   # the server
    .venv/bin/python -m nodes.speech.spoken "What is the capital of France?" question.wav
    .venv/bin/python examples/voice_client.py question.wav reply.wav [127.0.0.1:50051]

The WAV must be 16 kHz mono (what examples/speech_to_speech.json expects).
Audio goes out as 32 ms chunks at the pace of real speech, followed by a
second of silence so the VAD hears the end of the turn.
"""

import sys
import threading
import time
import wave

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
    samples = np.concatenate([samples, np.zeros(16000, "<i2")])  # a second of silence: end of turn
    ready = threading.Event()
    sent_all = {}

    def requests():
        yield spb.StreamRequest(init=spb.StreamInit(manifest=to_proto("examples/speech_to_speech.json")))
        ready.wait()
        start = time.perf_counter()
        for seq, i in enumerate(range(0, samples.size, CHUNK)):
            time.sleep(max(0.0, start + i / 16000 - time.perf_counter()))
            part = samples[i:i + CHUNK]
            buf = pb.DataBuffer(audio=pb.AudioBuffer(samples=part.tobytes(), sample_rate=16000, channels=1,
                                                     format=pb.AUDIO_FORMAT_I16, num_samples=part.size))
            yield spb.StreamRequest(data_chunk=spb.DataChunk(node_id="vad", buffer=buf, sequence=seq))
        sent_all["at"] = time.perf_counter()
        yield spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))

    reply, rate, first = [], 22050, None
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
                audio = resp.result.data_outputs["tts"].audio
                first = first or time.perf_counter()
                rate = audio.sample_rate
                reply.append(np.frombuffer(audio.samples, "<f4"))
                text = resp.result.data_outputs["tts"].metadata.get("text", "")
                print(f"  reply: {text!r} (heard: {resp.result.data_outputs['tts'].metadata.get('transcript')!r})")
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
