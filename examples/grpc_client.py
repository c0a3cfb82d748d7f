"""A remotemedia.v1 client: version, one unary run, one stream.

    make run                                  # in one shell: the server on 127.0.0.1:50051
    .venv/bin/python examples/grpc_client.py  # in another (from any directory)
    .venv/bin/python examples/grpc_client.py --help

Any grpcio client built from proto/ works the same way; this one uses the
stubs that ship with the engine.
"""

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc, streaming_pb2_grpc
from engine._proto import streaming_pb2 as spb
from engine.manifest_proto import to_proto

MANIFEST = Path(__file__).resolve().parent / "audio_pipeline.json"  # found from any directory


def audio(seconds: float, rate: int = 48_000) -> pb.DataBuffer:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return pb.DataBuffer(audio=pb.AudioBuffer(samples=samples.tobytes(), sample_rate=rate, channels=1,
                                              format=pb.AUDIO_FORMAT_F32, num_samples=samples.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="server (default: %(default)s)")
    parser.add_argument("--api-key", help="when the server sets api_keys (default: none)")
    args = parser.parse_args()
    try:
        run(args.address, (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ())
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            sys.exit(f"no server at {args.address} (start one with `make run`)")
        sys.exit(f"error: {exc.code().name}: {exc.details()}")


def run(address: str, metadata: tuple[tuple[str, str], ...]) -> None:
    manifest = to_proto(str(MANIFEST))  # or build the proto by hand
    with grpc.insecure_channel(address) as channel:
        unary = execution_pb2_grpc.PipelineExecutionServiceStub(channel)
        version = unary.GetVersion(epb.VersionRequest(client_version="v1"), metadata=metadata)
        print(f"server {version.version_info.runtime_version}, protocol {version.version_info.protocol_version}, "
              f"{len(version.version_info.supported_node_types)} node types")

        request = epb.ExecuteRequest(manifest=manifest)
        request.data_inputs["chunker"].CopyFrom(audio(1.0))
        response = unary.ExecutePipeline(request, metadata=metadata)
        if response.WhichOneof("outcome") == "error":
            sys.exit(f"error: {response.error.message}")
        out = response.result.data_outputs["output"].audio
        print(f"unary: {out.num_samples} samples @ {out.sample_rate} Hz in "
              f"{response.result.metrics.wall_time_ms:.1f} ms")

        def requests():
            yield spb.StreamRequest(init=spb.StreamInit(manifest=manifest))
            for seq in range(10):  # 10 chunks of 20 ms
                chunk = spb.DataChunk(node_id="chunker", buffer=audio(0.02), sequence=seq)
                yield spb.StreamRequest(data_chunk=chunk)
            yield spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))

        stream = streaming_pb2_grpc.StreamingPipelineServiceStub(channel)
        for resp in stream.StreamPipeline(requests(), metadata=metadata):
            kind = resp.WhichOneof("response")
            if kind == "ready":
                print(f"stream: session {resp.ready.session_id} ready")
            elif kind == "result":
                buf = resp.result.data_outputs["output"].audio
                print(f"  result for chunk {resp.result.sequence}: {buf.num_samples} samples "
                      f"({resp.result.processing_time_ms:.2f} ms in the engine)")
            elif kind == "error":
                sys.exit(f"error: {resp.error.message}")
            elif kind == "closed":
                print(f"stream closed: {resp.closed.reason}")


if __name__ == "__main__":
    main()
