"""The committed stubs match the .proto files, and the wire numbers are the contract's."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_committed_stubs_match_proto_files(tmp_path):
    import gen_proto

    gen_proto.generate(tmp_path)
    committed = ROOT / "src" / "engine" / "_proto"
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    for name in names:
        assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), f"{name} drifted; run make proto"


def test_field_numbers_follow_the_contract():
    from engine._proto import common_pb2, execution_pb2, streaming_pb2

    def num(msg, field):
        return msg.DESCRIPTOR.fields_by_name[field].number

    assert num(common_pb2.DataBuffer, "metadata") == 10
    assert num(common_pb2.AudioBuffer, "num_samples") == 5
    assert num(execution_pb2.NodeManifest, "output_types") == 9
    assert num(execution_pb2.Connection, "from") == 1
    assert num(streaming_pb2.StreamRequest, "audio_chunk") == 3
    assert num(streaming_pb2.StreamResponse, "closed") == 5
    assert num(streaming_pb2.StreamResponse, "init_progress") == 6
    assert num(streaming_pb2.StreamMetrics, "cache_hit_rate") == 12
    assert streaming_pb2.StreamControl.COMMAND_CANCEL == 2
    assert common_pb2.ERROR_TYPE_TYPE_VALIDATION == 7
    assert execution_pb2.DESCRIPTOR.package == "remotemedia.v1"
    assert [m.name for m in execution_pb2.DESCRIPTOR.services_by_name["PipelineExecutionService"].methods] == [
        "ExecutePipeline", "GetVersion"]
