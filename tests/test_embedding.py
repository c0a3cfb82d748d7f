"""Embedding: a host app with a heavy, side-effect-printing __main__.

Node processes are forked from the engine's own zygote (a fresh interpreter
running `engine.zygote`), so the host's __main__ is neither re-imported nor
re-run in them, and the interpreter named by python_executable runs them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multiprocess

HOST = textwrap.dedent('''
    import asyncio, os, sys, time
    print(f"HOST-MAIN-RAN pid={os.getpid()}", flush=True)
    time.sleep(0.3)  # a heavy import-time cost the nodes must not pay
    import signal
    signal.signal(signal.SIGUSR1, lambda *a: print("host handler", flush=True))

    from engine import Engine, RuntimeData

    M = {"version": "v1", "metadata": {"name": "embed"},
         "nodes": [{"id": "sum", "node_type": "ChecksumNode"}], "connections": []}

    async def main():
        async with Engine({"test_nodes": True, "python_executable": sys.executable}) as engine:
            r = await engine.execute(M, {"sum": RuntimeData.text("hi")})
            print(f"NODE-PID={r.outputs['sum'].value['pid']}", flush=True)

    if __name__ == "__main__":
        asyncio.run(main())
''')


def test_host_main_is_not_rerun_in_node_processes(tmp_path):
    script = tmp_path / "host_app.py"
    script.write_text(HOST)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("HOST-MAIN-RAN") == 1, res.stdout
    node_pid = int(res.stdout.split("NODE-PID=")[1].split()[0])
    host_pid = int(res.stdout.split("pid=")[1].split()[0])
    assert node_pid != host_pid


def test_python_executable_is_the_one_running_nodes(tmp_path):
    # a wrapper interpreter that leaves a mark proves the configured executable is used
    mark = tmp_path / "used"
    wrapper = tmp_path / "py"
    wrapper.write_text(f"#!/bin/sh\ntouch {mark}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    code = textwrap.dedent(f'''
        import asyncio
        from engine import Engine, RuntimeData
        M = {{"version": "v1", "metadata": {{"name": "x"}},
              "nodes": [{{"id": "e", "node_type": "EchoNode"}}], "connections": []}}
        async def main():
            async with Engine({{"test_nodes": True, "python_executable": "{wrapper}"}}) as engine:
                r = await engine.execute(M, {{"e": RuntimeData.text("ok")}})
                print(r.outputs["e"].text)
        asyncio.run(main())
    ''')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok" and mark.exists()


def test_engine_killed_leaves_nothing_after_next_start(tmp_path):
    """A killed engine's node processes exit (parent death), and the next engine sweeps its files."""
    import os
    import signal
    import time

    import psutil

    root = tmp_path / "ipc"
    code = textwrap.dedent(f'''
        import asyncio, sys
        from engine import Engine, RuntimeData
        M = {{"version": "v1", "metadata": {{"name": "x"}},
              "nodes": [{{"id": "e", "node_type": "EchoNode"}}], "connections": []}}
        async def main():
            engine = Engine({{"test_nodes": True, "ipc_root": "{root}"}})
            s = engine.stream(M)
            await s.start()
            print("PIDS", " ".join(str(r.pid) for r in s.runners.values()), flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    ''')
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    node_pids = [int(p) for p in line.split()[1:]]
    engine_pid = proc.pid
    zygote = [c.pid for c in psutil.Process(engine_pid).children()]
    os.kill(engine_pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in node_pids + zygote) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in node_pids + zygote)
    stale = [f for f in os.listdir("/dev/shm") if f.startswith(f"rme{engine_pid}x")]
    assert stale  # the killed engine could not clean up
    from engine.ipc.iox import sweep_stale

    removed = sweep_stale(str(root))
    assert removed and not [f for f in os.listdir("/dev/shm") if f.startswith(f"rme{engine_pid}x")]
    assert not any(p.name.startswith(f"rme{engine_pid}x") for p in root.iterdir())
