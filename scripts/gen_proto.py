"""Generate the remotemedia.v1 Python stubs from proto/ into src/engine/_proto.

The stubs are committed; tests/test_proto_stubs.py regenerates them into a
temporary folder and fails when they differ from the committed ones.
Usage: python scripts/gen_proto.py [OUTPUT_DIR]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "src" / "engine" / "_proto"
PROTOS = ("common.proto", "execution.proto", "streaming.proto")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes top-level imports ("import common_pb2"); make them
    # package-relative so the stubs live inside engine._proto.
    for path in out_dir.glob("*_pb2*.py*"):
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        text = re.sub(r"^import (\w+_pb2)$", r"from . import \1", text, flags=re.M)
        path.write_text(text)
    (out_dir / "__init__.py").write_text('"""Generated remotemedia.v1 stubs (scripts/gen_proto.py)."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
