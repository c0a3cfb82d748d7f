"""An existing-client check: a Node.js @grpc/grpc-js client (proto-loader, keepCase)
against the real server. The client lives in tests/node_client (`make test`
installs its locked npm dependencies)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np

from engine import RuntimeData
from nodes.testing import checksum

CLIENT = Path(__file__).resolve().parent / "node_client"


async def _run_client(*args: str) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (the project's machines have it; see README)"
    assert (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "run `make test` (or `npm ci` in tests/node_client) to install the Node client's dependencies"
    proc = await asyncio.create_subprocess_exec(node, str(CLIENT / "client.js"), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def _expected_checksum(i: int) -> str:
    x = np.sin((np.arange(320) + i) / 7).astype(np.float32)
    return checksum(RuntimeData.audio(x, 16000))


async def test_node_client_works_unchanged(server):
    seen = await _run_client(server.address)
    assert "failure" not in seen, seen
    assert seen["version"]["compatible"] is True and seen["version"]["protocol"] == "v1"
    assert "EchoNode" in seen["version"]["node_types"]
    assert seen["unary"] == {"outcome": "result", "text": "héllo from node", "status": "EXECUTION_STATUS_SUCCESS"}
    assert seen["unary_error"] == {"outcome": "error", "error_type": "ERROR_TYPE_VALIDATION", "node": "x"}
    s = seen["stream"]
    assert s["kinds"][0] == "ready" and s["kinds"][-1] == "closed", s["kinds"]
    assert [r["sequence"] for r in s["results"]] == list(range(8))
    assert [r["value"]["checksum"] for r in s["results"]] == [_expected_checksum(i) for i in range(8)]
    assert seen["stream_error"] == {"kinds": ["error"], "error_type": "ERROR_TYPE_VALIDATION", "node": "sum"}


async def test_node_client_with_api_key(make_server):
    srv = await make_server(server={"api_keys": ["node-key"]})
    assert (await _run_client(srv.address))["failure"]["code"] == 16  # UNAUTHENTICATED
    seen = await _run_client(srv.address, "node-key")
    assert "failure" not in seen and seen["unary"]["outcome"] == "result"
