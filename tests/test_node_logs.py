"""Node process logs in the engine's log (engine.ipc.logs).

The queue and the record round trip are tested in this process; the fd-level
capture (print, os.write, a C library's puts, a subprocess) and the flood in
real child processes, since they take over the process's stdout and stderr;
then the whole path, in a real engine with nodes in their own processes
(tests/lognodes.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import TEST_IPC_ROOT, eventually, manifest, probed_engine

from engine.data import RuntimeData
from engine.ipc.control import SyncChannel
from engine.ipc.logs import PREFIX, LogBatch, LogHandler, LogQueue, NodeLog

# ---------------------------------------------------------------- in this process


class Received:
    """A `send` for LogQueue: keeps each batch as it would arrive (pickled and back)."""

    def __init__(self) -> None:
        self.batches: list[LogBatch] = []

    def __call__(self, batch: LogBatch) -> None:
        self.batches.append(pickle.loads(pickle.dumps(batch)))

    def handle_all(self, sink: NodeLog) -> None:
        for batch in self.batches:
            sink.handle(batch)


@pytest.fixture
def node_logger():
    """A logger standing in for a node process's: outside the logging tree, so
    its records reach only the handlers a test adds (caplog, on the root
    logger, must see only what the engine side emits)."""
    logger = logging.Logger("lognodes.unit", logging.DEBUG)
    yield logger
    for h in list(logger.handlers):
        logger.removeHandler(h)


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def node_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(PREFIX)]


def test_records_arrive_with_level_message_time_and_ids(caplog, node_logger):
    received = Received()
    queue = LogQueue(received)
    originals = Keep()
    node_logger.addHandler(LogHandler(queue, logging.NOTSET))
    node_logger.addHandler(originals)
    node_logger.debug("loading %s from %d", "model.bin", 3)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        node_logger.exception("step %d failed", 7)
    node_logger.warning("with a stack", stack_info=True)
    assert queue.flush(10.0), "the queue did not drain"
    queue.close(10.0)

    caplog.set_level(logging.DEBUG, logger=PREFIX)
    sink = NodeLog("sess-1", "node-a", "Whisper")
    received.handle_all(sink)
    got = node_records(caplog)
    assert [(r.name, r.levelno, r.getMessage()) for r in got] == [
        ("engine.node.lognodes.unit", logging.DEBUG, "loading model.bin from 3"),
        ("engine.node.lognodes.unit", logging.ERROR, "step 7 failed"),
        ("engine.node.lognodes.unit", logging.WARNING, "with a stack"),
    ], f"records differ: {got}"
    for rec, orig in zip(got, originals.records, strict=True):
        assert (rec.session_id, rec.node_id, rec.node_type, rec.node_logger) == \
            ("sess-1", "node-a", "Whisper", "lognodes.unit")
        assert rec.created == orig.created, "the record's time is not the node's"
        assert (rec.pathname, rec.lineno, rec.funcName) == (orig.pathname, orig.lineno, orig.funcName)
    text = logging.Formatter("%(message)s").format(got[1])
    assert "step 7 failed" in text and "ZeroDivisionError: division by zero" in text, text
    assert got[2].stack_info and "test_records_arrive" in got[2].stack_info
    assert sink.received == 3 and sink.dropped == 0


def test_a_full_queue_drops_and_the_count_arrives(caplog, node_logger):
    entered, release = threading.Event(), threading.Event()
    received = Received()

    def send(batch: LogBatch) -> None:
        entered.set()
        release.wait()  # the engine reads nothing meanwhile
        received(batch)

    queue = LogQueue(send, capacity=10)
    node_logger.addHandler(LogHandler(queue, logging.NOTSET))
    node_logger.info("first")  # taken by the sender, which then waits in send()
    assert entered.wait(10.0), "the sender never sent"
    for i in range(25):  # returns although nobody reads: 10 queued, 15 dropped
        node_logger.info("flood %d", i)
    assert queue.dropped == 15, f"dropped {queue.dropped}, expected 15"
    release.set()
    assert queue.flush(10.0), "the queue did not drain"
    queue.close(10.0)

    caplog.set_level(logging.INFO, logger=PREFIX)
    sink = NodeLog("sess-1", "flooder")
    received.handle_all(sink)
    messages = [r.getMessage() for r in node_records(caplog) if r.name != PREFIX]
    assert messages == ["first", *(f"flood {i}" for i in range(10))], messages
    warned = [r for r in caplog.records if r.name == PREFIX]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, warned
    assert warned[0].getMessage().startswith("15 log records dropped"), warned[0].getMessage()
    assert (warned[0].node_id, warned[0].dropped) == ("flooder", 15)
    assert (sink.received, sink.dropped) == (11, 15)


def test_once_the_engine_is_gone_records_are_counted_not_raised(node_logger):
    def send(batch: LogBatch) -> None:
        raise BrokenPipeError("engine gone")

    queue = LogQueue(send)
    node_logger.addHandler(LogHandler(queue, logging.NOTSET))
    node_logger.info("lost")
    assert queue.flush(10.0), "flush waited for an engine that is gone"
    node_logger.info("also lost")
    assert (queue.sent, queue.dropped) == (0, 2)
    queue.close(10.0)


def test_a_bad_format_string_keeps_the_record(caplog, node_logger):
    received = Received()
    queue = LogQueue(received)
    node_logger.addHandler(LogHandler(queue, logging.NOTSET))
    node_logger.info("%d items", "many")
    assert queue.flush(10.0)
    queue.close(10.0)
    caplog.set_level(logging.INFO, logger=PREFIX)
    received.handle_all(NodeLog("s", "n"))
    (rec,) = node_records(caplog)
    assert "%d items" in rec.getMessage() and "cannot format" in rec.getMessage(), rec.getMessage()


def test_the_engine_level_filters_node_records(caplog, node_logger):
    received = Received()
    queue = LogQueue(received)
    node_logger.addHandler(LogHandler(queue, logging.NOTSET))
    node_logger.info("chatter")
    node_logger.error("trouble")
    assert queue.flush(10.0)
    queue.close(10.0)
    caplog.set_level(logging.WARNING, logger=PREFIX)
    received.handle_all(NodeLog("s", "n"))
    assert [r.getMessage() for r in node_records(caplog)] == ["trouble"]


# ---------------------------------------------------------------- in a real process


def run_child(code: str, *, signal_fd: bool = False) -> tuple[list[LogBatch], int, bytes, bytes]:
    """Run `code` in a fresh interpreter with `cap = capture(...)` installed on a
    control-lane socket; returns (batches, the child's pid, what still reached
    its real stdout, its real stderr). With `signal_fd`, the child gets `done_fd`
    and the batches are read only once it wrote there."""
    ours, theirs = socket.socketpair()
    done_r, done_w = os.pipe() if signal_fd else (None, None)
    prelude = textwrap.dedent(f"""
        import ctypes, logging, os, socket, subprocess, sys, warnings
        from engine.ipc.control import SyncChannel
        from engine.ipc.logs import capture
        ch = SyncChannel(socket.socket(fileno={theirs.fileno()}))
        done_fd = {done_w}
        cap = capture(ch.send, level=logging.DEBUG)
    """)
    fds = [theirs.fileno(), *([done_w] if signal_fd else [])]
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], pass_fds=fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    theirs.close()
    if signal_fd:
        os.close(done_w)
        assert os.read(done_r, 1) == b"x", "the child did not get through its flood"
        os.close(done_r)
    channel = SyncChannel(ours)
    batches = []
    while (msg := channel.recv()) is not None:
        assert isinstance(msg, LogBatch), f"not a log batch: {msg!r}"
        batches.append(msg)
    ours.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"child exited {proc.returncode}: {err.decode(errors='replace')}"
    return batches, proc.pid, out, err


@pytest.mark.multiprocess
def test_logging_warnings_and_every_kind_of_stray_line_arrive(caplog):
    batches, pid, out, err = run_child("""
        log = logging.getLogger("lognodes.child")
        log.info("hello %s", "engine")
        warnings.warn("careful now")
        print("a python print")
        os.write(1, b"raw fd 1\\n")
        ctypes.CDLL(None).puts(b"from C puts")
        subprocess.run(["/bin/echo", "from a subprocess"], check=True)
        print("python stderr", file=sys.stderr)
        os.write(2, b"raw fd 2\\n")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("it failed")
        os._exit(0 if cap.flush(30.0) else 3)  # as a node process ends
    """)
    assert (out, err) == (b"", b""), f"output escaped the capture: {out!r} {err!r}"
    caplog.set_level(logging.DEBUG, logger=PREFIX)
    sink = NodeLog("sess-9", "node-p", "Printer")
    for batch in batches:
        sink.handle(batch)
    got = node_records(caplog)
    assert all((r.session_id, r.node_id, r.process) == ("sess-9", "node-p", pid) for r in got), got

    def of(name: str) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in got if r.name == name]

    assert of("engine.node.lognodes.child")[0] == (logging.INFO, "hello engine")
    assert of("engine.node.stdout") == [(logging.INFO, line) for line in (
        "a python print", "raw fd 1", "from C puts", "from a subprocess")]
    assert of("engine.node.stderr") == [(logging.WARNING, "python stderr"), (logging.WARNING, "raw fd 2")]
    (warned,) = of("engine.node.py.warnings")
    assert warned[0] == logging.WARNING and "UserWarning: careful now" in warned[1], warned
    (failed,) = [r for r in got if r.getMessage() == "it failed"]
    assert failed.levelno == logging.ERROR and "ZeroDivisionError" in (failed.exc_text or ""), failed.exc_text
    assert sink.dropped == 0


@pytest.mark.multiprocess
def test_a_flooding_process_is_not_blocked_and_its_drops_are_counted(caplog):
    # Nobody reads the control lane until the child has logged and printed
    # everything: it must get through (the signal on done_fd), and every
    # record must either arrive or be counted as dropped.
    n = 20_000
    batches, _pid, out, err = run_child(f"""
        log = logging.getLogger("lognodes.flood")
        for i in range({n}):
            log.info("record %d", i)
            print("line", i)
        os.write(done_fd, b"x")
        os._exit(0 if cap.flush(60.0) else 3)
    """, signal_fd=True)
    assert (out, err) == (b"", b""), f"output escaped the capture: {out!r} {err!r}"
    caplog.set_level(logging.INFO, logger=PREFIX)
    sink = NodeLog("sess-f", "flooder")
    for batch in batches:
        sink.handle(batch)
    assert sink.dropped > 0, "a flood larger than every buffer lost nothing: the bound is not enforced"
    assert sink.received + sink.dropped == 2 * n, \
        f"{sink.received} received + {sink.dropped} dropped != {2 * n} logged"
    warned = [r for r in caplog.records if r.name == PREFIX]
    assert warned and sum(r.dropped for r in warned) == sink.dropped
    assert all(r.getMessage().split()[1:4] == ["log", "records", "dropped:"] for r in warned)


@pytest.mark.multiprocess
def test_close_sends_the_unfinished_line_and_gives_stdout_back(caplog):
    batches, _pid, out, err = run_child("""
        print("captured")
        print("no newline yet", end="")
        cap.close(30.0)
        print("after close")
        logging.getLogger("lognodes.child").warning("not captured any more")
    """)
    assert out == b"after close\n", f"stdout was not given back: {out!r}"
    assert b"not captured any more" in err, f"the root handler was not removed: {err!r}"
    caplog.set_level(logging.INFO, logger=PREFIX)
    sink = NodeLog("s", "n")
    for batch in batches:
        sink.handle(batch)
    assert [r.getMessage() for r in node_records(caplog)] == ["captured", "no newline yet"]


# ---------------------------------------------------------------- in a real engine


def log_engine():
    """A leak-probed engine whose registry also has the nodes of tests/lognodes.py."""
    import lognodes

    from engine.catalog import default_registry
    from engine.config import RuntimeConfig

    registry = default_registry(RuntimeConfig.load({"test_nodes": True, "ipc_root": TEST_IPC_ROOT}))
    registry.register(lognodes.ChattyNode)
    registry.register(lognodes.FloodNode)
    return probed_engine(registry=registry)


@pytest.mark.multiprocess
async def test_what_a_node_process_says_arrives_with_its_session_and_node(caplog):
    caplog.set_level(logging.INFO, logger=PREFIX)
    async with log_engine() as engine:
        m = manifest([{"id": "talker", "node_type": "LogChattyNode"}])
        async with engine.stream(m) as s:
            session_id = s.id
            for text in ("one", "two"):
                await s.send("talker", RuntimeData.text(text))
            await s.close()
            outs = [o async for o in s]
            await s.wait_closed()
    assert [o.data.text for o in outs] == ["one", "two"]
    got = [r for r in node_records(caplog) if getattr(r, "node_id", None) == "talker"]
    assert got and all((r.session_id, r.node_type) == (session_id, "LogChattyNode") for r in got), got

    def of(name: str) -> list[str]:
        return [r.getMessage() for r in got if r.name == name]

    assert of("engine.node.lognodes.chatty")[:3] == ["loading for talker", "got one", "failed on purpose with one"]
    assert of("engine.node.stdout") == ["printed one", "fd 1 one", "C puts one",
                                        "printed two", "fd 1 two", "C puts two"]
    assert of("engine.node.stderr") == ["to stderr one", "to stderr two"]
    assert [w for w in of("engine.node.py.warnings") if "UserWarning: careful with" in w] and \
        len(of("engine.node.py.warnings")) == 2, of("engine.node.py.warnings")
    (failed,) = [r for r in got if r.getMessage() == "failed on purpose with two"]
    assert failed.levelno == logging.ERROR and "ValueError: two" in (failed.exc_text or ""), failed.exc_text
    assert {r.levelno for r in got if r.name == "engine.node.stderr"} == {logging.WARNING}


@pytest.mark.multiprocess
async def test_a_flooding_node_is_not_blocked_and_its_drops_are_counted(caplog):
    # The node logs and prints 2 × lines in one process() call. Its sender
    # thread hands at most one batch to the engine per turn it gets at the
    # GIL while the node's thread produces many times that, so the queue
    # overflows: the node must still return its frame, and every record it
    # made must arrive or be counted as dropped.
    lines = 20_000
    caplog.set_level(logging.INFO, logger=PREFIX)
    async with log_engine() as engine:
        m = manifest([{"id": "flooder", "node_type": "LogFloodNode", "params": {"lines": lines}}])
        async with engine.stream(m) as s:
            await s.send("flooder", RuntimeData.text("go"))
            async with asyncio.timeout(60):
                out = await anext(aiter(s))
            assert out.data.text == "go"

            def accounted() -> tuple[int, int]:
                arrived = sum(1 for r in caplog.records if getattr(r, "node_id", None) == "flooder"
                              and r.name in ("engine.node.lognodes.flood", "engine.node.stdout"))
                extra = s.snapshot()["nodes"]["flooder"]["extra"]
                return arrived, extra.get("log_records_dropped", 0)

            await eventually(lambda: sum(accounted()) >= 2 * lines, "every record arrived or counted", 60.0)
            arrived, dropped = accounted()
            await s.close()
            await s.wait_closed()
    assert arrived + dropped == 2 * lines, f"{arrived} arrived + {dropped} dropped != {2 * lines} made"
    assert dropped > 0, "a flood past every buffer lost nothing: the bound is not enforced"
    warned = [r for r in caplog.records if r.name == PREFIX and getattr(r, "node_id", None) == "flooder"]
    assert warned and sum(r.dropped for r in warned) == dropped, warned
    assert all(r.levelno == logging.WARNING and " log records dropped" in r.getMessage() for r in warned)
