"""A node process imports its node's class by module and name, so a class it cannot
import that way (one defined in the script being run, or inside a function, or made
at run time) is refused with one line that says what to do, from real scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

SHOUT = textwrap.dedent('''
    import os

    from engine.data import RuntimeData
    from engine.node import Node

    class Shout(Node):
        node_type = "Shout"
        multiprocess = {multiprocess}

        def process(self, frame):
            return RuntimeData.text(f"{{frame.text.upper()}} from {{os.getpid()}}")
''')

RUN = textwrap.dedent('''
    import asyncio, os
    from engine import Engine, RuntimeData

    async def main():
        async with Engine() as engine:
            engine.registry.register(Shout)
            m = {{"version": "v1", "metadata": {{"name": "s"}},
                  "nodes": [{{"id": "s", "node_type": "Shout"{executor}}}], "connections": []}}
            r = await engine.execute(m, {{"s": RuntimeData.text("hi")}})
            print(r.outputs["s"].text, "in", os.getpid())

    if __name__ == "__main__":
        asyncio.run(main())
''')


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(body)
    return subprocess.run([sys.executable, "app.py"], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                          timeout=120)


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "AttributeError" not in res.stderr, res.stderr
    return last


def test_a_node_class_in_the_script_is_refused_with_how_to_move_it(tmp_path):
    line = _error_line(_script(tmp_path, SHOUT.format(multiprocess=True) + RUN.format(executor="")))
    assert line == ("ValueError: Shout is defined in __main__ (the script being run), which a node process "
                    "cannot import: move the class into a module beside the script (say mynodes.py) and "
                    "`from mynodes import Shout`; or register it with executor='native' to run it in this "
                    "process"), line
    # what it says works: the class in mynodes.py runs in a node process of its own
    (tmp_path / "mynodes.py").write_text(SHOUT.format(multiprocess=True))
    res = _script(tmp_path, "from mynodes import Shout\n" + RUN.format(executor=""))
    assert res.returncode == 0, res.stderr
    text, _, engine_pid = res.stdout.strip().rpartition(" in ")
    assert text.startswith("HI from ") and text.split()[-1] != engine_pid, res.stdout


def test_asking_a_process_for_a_node_class_in_the_script_says_why_not(tmp_path):
    body = SHOUT.format(multiprocess=False) + RUN.format(executor=', "executor": "multiprocess"')
    line = _error_line(_script(tmp_path, body))
    assert line.startswith("engine.errors.ValidationError: [node s] $.nodes[0].executor: "), line
    assert line.endswith("runs on the 'native' executor, not 'multiprocess': Shout is defined in __main__ (the "
                         "script being run), which a node process cannot import: move the class into a module "
                         "beside the script (say mynodes.py) and `from mynodes import Shout`"), line
    # in the engine's own process it runs as it is
    res = _script(tmp_path, SHOUT.format(multiprocess=False) + RUN.format(executor=""))
    assert res.returncode == 0 and res.stdout.startswith("HI from "), res.stderr


def test_a_node_class_defined_in_a_function_is_refused(tmp_path):
    (tmp_path / "factory.py").write_text("def make():\n" + textwrap.indent(SHOUT.format(multiprocess=True), "    ")
                                         + "    return Shout\n")
    line = _error_line(_script(tmp_path, "from factory import make\nShout = make()\n" + RUN.format(executor="")))
    assert line == ("ValueError: make.<locals>.Shout is defined inside a function, where a node process cannot "
                    "find it: define it at the top level of factory; or register it with executor='native' to "
                    "run it in this process"), line


def test_a_node_class_made_at_run_time_fails_its_node_in_one_line(tmp_path):
    # type() gives the class a plain name in its module, which only has it once make() ran
    (tmp_path / "dynamic.py").write_text(textwrap.dedent('''
        from engine.node import Node

        def make():
            return type("Shout", (Node,), {"node_type": "Shout", "multiprocess": True,
                                           "process": lambda self, frame: frame})
    '''))
    line = _error_line(_script(tmp_path, "from dynamic import make\nShout = make()\n" + RUN.format(executor="")))
    assert line == ("engine.errors.NodeExecutionError: [node s] initialize() failed: the node process imported "
                    "'dynamic' but found no Shout in it: define the class at the top level of 'dynamic', so that "
                    "importing the module makes it"), line
