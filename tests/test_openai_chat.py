"""OpenAIChatNode against a real llama.cpp server (xllamacpp's, on 127.0.0.1) running the
bundled SmolLM2: the same replies and contract as LlamaCppNode, cancellation that closes
the HTTP stream, and typed errors for every way the server can fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import urllib.request

import psutil
import pytest
from chat_replies import BOOKS, check_capped_at_a_sentence, said
from conftest import eventually, probed_engine
from speech_audio import VOICE_LOOP, question, wer

from engine import RuntimeData
from engine.catalog import default_registry
from engine.errors import NodeExecutionError, ValidationError
from engine.manifest import load_document
from engine.turns import TurnEvent, turn_of
from nodes.speech.llama_server import LocalLlamaServer

pytestmark = pytest.mark.speech

STORY = "Write a very long story, many paragraphs."


@pytest.fixture(scope="module")
def llama_server():
    """One server for the module, started before any test's leak snapshot."""
    server = LocalLlamaServer(threads=1)
    server.start()
    yield server
    server.close()


@pytest.fixture
def doomed_server():
    """A server of the test's own, to kill."""
    server = LocalLlamaServer(threads=1)
    server.start()
    yield server
    server.close()


def chat(node_id: str = "llm", **params) -> dict:
    return {"version": "v1", "metadata": {"name": "openai-chat"},
            "nodes": [{"id": node_id, "node_type": "OpenAIChatNode", "params": params}], "connections": []}


def probed(llm_params: dict) -> dict:
    """TurnProbeNode (turn-tagged texts, turn events on command) → the OpenAI node."""
    return {"version": "v1", "metadata": {"name": "openai-turns"}, "nodes": [
        {"id": "ctl", "node_type": "TurnProbeNode", "executor": "native", "params": {}},
        {"id": "llm", "node_type": "OpenAIChatNode", "params": llm_params}],
        "connections": [{"from": "ctl", "to": "llm"}]}


def metrics(server: LocalLlamaServer) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (line.split()[:2] for line in lines if line.startswith("llamacpp:"))}


@contextlib.contextmanager
def closed_port():
    """A loopback port nothing listens on (held bound meanwhile, so nothing else takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def silent_server():
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


async def node_error(engine, doc: dict, text: str = "Hello.") -> NodeExecutionError:
    with pytest.raises(NodeExecutionError) as info:
        await engine.execute(doc, {doc["nodes"][-1]["id"]: RuntimeData.text(text)})
    return info.value


# ---------------------------------------------------------------- replies


async def test_replies_stream_as_phrases_the_same_as_llamacppnode(mp_engine, llama_server):
    """Same model, greedy, same prompt: the same phrases and metadata as the in-process node."""
    for asked in ("Name three colors.", "What is the capital of France?"):
        replies = {}
        for node_type, extra in (("OpenAIChatNode", {"base_url": llama_server.base_url}), ("LlamaCppNode", {})):
            doc = chat(max_tokens=40, first_phrase_max_words=3, **extra)
            doc["nodes"][0]["node_type"] = node_type
            result = await mp_engine.execute(doc, {"llm": RuntimeData.text(asked)})
            replies[node_type] = result.all_outputs["llm"]
        phrases = replies["OpenAIChatNode"]
        assert [p.text for p in phrases] == [p.text for p in replies["LlamaCppNode"]], replies
        assert said(phrases) and len(phrases[0].text.split()) <= 3, phrases
        assert phrases[-1].metadata["final"] == "1"
        assert all(p.metadata.get("final") != "1" for p in phrases[:-1])
        assert all(p.metadata["transcript"] == asked for p in phrases)
        assert [p.metadata["phrase_index"] for p in phrases] == [str(i) for i in range(len(phrases))]


async def test_a_turns_phrases_carry_its_id_in_a_pipeline(mp_engine, llama_server):
    async with mp_engine.stream(probed({"base_url": llama_server.base_url, "max_tokens": 24})) as s:
        await s.send("ctl", RuntimeData.text("ctl tagged 7"))  # a text of turn 7 for the LLM
        await s.close()
        phrases = [out.data async for out in s if out.node_id == "llm"]
    assert phrases and all(turn_of(p) == "7" and p.metadata["transcript"] == "ctl:7" for p in phrases), phrases
    assert phrases[-1].metadata["final"] == "1"


async def test_history_keeps_what_was_played_of_an_interrupted_reply(llama_server):
    from nodes.speech.openai_chat import OpenAIChatNode

    spec = default_registry().get("OpenAIChatNode")
    node = OpenAIChatNode("llm", spec.normalize_params({"base_url": llama_server.base_url, "max_tokens": 24}))
    await node.initialize()
    try:
        phrases = [f async for f in node.process(RuntimeData.text("What is the capital of France?",
                                                                   metadata={"turn_id": "1"}))]
        node.on_turn_event(TurnEvent("commit", "1"))
        assert said(phrases), "no reply"
        node.on_turn_event(TurnEvent("played", "1", {"text": "The capital"}))
        assert node.messages("And of Italy?")[-3:] == [
            {"role": "user", "content": "What is the capital of France"},
            {"role": "assistant", "content": "The capital"},
            {"role": "user", "content": "And of Italy?"}]
        speculative = RuntimeData.text("What is", metadata={"turn_id": "2", "speculative": "1"})
        node.params["reply_before_commit"] = False
        # no model score and no reply before the commit; "What is" is a sentence still being built: eou 0
        early = [f async for f in node.process(speculative)]
        assert [(TurnEvent.of(f).kind, TurnEvent.of(f).data) for f in early] == [("eou", {"probability": 0.0})]
        finished = RuntimeData.text("What time", metadata={"turn_id": "3", "speculative": "1"})
        assert [f async for f in node.process(finished)] == [], "no eou event, no reply before the commit"
        node.on_turn_event(TurnEvent("cancel", "3"))
        answer = [f async for f in node.on_turn_event(TurnEvent("commit", "2"))]
        assert answer and answer[-1].metadata["final"] == "1" and turn_of(answer[0]) == "2"
    finally:
        await node.cleanup()


async def test_a_capped_reply_is_cut_at_its_last_sentence(llama_server):
    from nodes.speech.openai_chat import OpenAIChatNode

    spec = default_registry().get("OpenAIChatNode")
    node = OpenAIChatNode("llm", spec.normalize_params({
        "base_url": llama_server.base_url, "max_tokens": 32, "system_prompt": "You are a helpful assistant."}))
    await node.initialize()
    try:
        await check_capped_at_a_sentence(node, BOOKS, 32)
    finally:
        await node.cleanup()


CAPITAL = "What is the capital of France?"


@pytest.fixture(scope="module")
def asked_aloud():
    """The question spoken (by Piper, loaded in this process before any leak snapshot)."""
    return question(CAPITAL)


async def test_the_voice_loop_answers_through_the_server(mp_engine, llama_server, asked_aloud):
    """VAD → turns → Whisper → OpenAIChatNode → Piper: no `eou` event comes, so the
    accumulator ends the turn after its endpointing_ms pause, and the reply is spoken."""
    doc = load_document(VOICE_LOOP)
    [llm] = [n for n in doc["nodes"] if n["id"] == "llm"]
    llm["node_type"] = "OpenAIChatNode"
    llm["params"] = {"base_url": llama_server.base_url, "max_tokens": 48, "first_phrase_max_words": 4}
    q, audio = CAPITAL, asked_aloud
    async with mp_engine.stream(doc) as s:
        for i in range(0, audio.size, 512):
            await s.send("vad", RuntimeData.audio(audio[i:i + 512], 16000))
        await s.close()
        frames = [out.data async for out in s if out.node_id == "tts" and out.data.kind.name == "AUDIO"]
    assert frames, "no reply audio"
    assert len({turn_of(f) for f in frames}) == 1, "one turn, one reply"
    assert wer(q, frames[0].metadata["transcript"]) < 0.2, frames[0].metadata
    assert " ".join(f.metadata["text"] for f in frames if "text" in f.metadata).strip(), "the reply said nothing"


# ---------------------------------------------------------------- cancellation


async def test_a_cancelled_turn_closes_its_stream_and_the_server_stops(mp_engine, llama_server):
    before = metrics(llama_server)["llamacpp:tokens_predicted_total"]
    doc = probed({"base_url": llama_server.base_url, "max_tokens": 2000, "max_phrase_words": 3,
                  "system_prompt": STORY})
    async with mp_engine.stream(doc) as s:
        outputs = []

        async def read():
            async for out in s:
                outputs.append(out)

        reader = asyncio.get_running_loop().create_task(read())
        await s.send("ctl", RuntimeData.text("ctl tagged x"))
        await eventually(lambda: len(outputs) >= 3, "the reply to stream", timeout_s=60)
        assert metrics(llama_server)["llamacpp:requests_processing"] == 1, "the server should be generating"
        await s.send("ctl", RuntimeData.text("ctl event cancel x"))
        n = len(outputs)
        await eventually(lambda: metrics(llama_server)["llamacpp:requests_processing"] == 0,
                         "the server to see the stream closed")
        predicted = metrics(llama_server)["llamacpp:tokens_predicted_total"] - before
        assert predicted < 2000, f"the server wrote the whole reply ({predicted:.0f} tokens): nothing stopped it"
        assert len(outputs) <= n + 1, "phrases of the cancelled turn came out after its cancel"
        await s.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert metrics(llama_server)["llamacpp:tokens_predicted_total"] - before == predicted, \
        "the server went on generating after the stream was closed"


async def test_closing_the_session_mid_reply_closes_the_stream(mp_engine, llama_server):
    async with mp_engine.stream(chat(base_url=llama_server.base_url, max_tokens=2000, system_prompt=STORY,
                                     max_phrase_words=3)) as s:
        await s.send("llm", RuntimeData.text("Tell me a story."))
        seen = 0
        async for _ in s:
            seen += 1
            if seen == 3:
                break
    await eventually(lambda: metrics(llama_server)["llamacpp:requests_processing"] == 0,
                     "the server to see the stream closed")


# ---------------------------------------------------------------- errors


async def test_a_server_that_goes_away_mid_reply_is_a_typed_error(mp_engine, doomed_server):
    async with mp_engine.stream(chat(base_url=doomed_server.base_url, max_tokens=2000, system_prompt=STORY,
                                     max_phrase_words=3)) as s:
        await s.send("llm", RuntimeData.text("Tell me a story."))
        seen = 0
        with pytest.raises(NodeExecutionError) as info:
            async for _ in s:
                seen += 1
                if seen == 2:
                    doomed_server.kill()
    err = info.value
    assert err.node_id == "llm" and err.context["field"] == "base_url", (err, err.context)
    assert "went away in the middle of a reply" in str(err) and "OpenAIChatNode" in str(err), str(err)


async def test_an_unreachable_server_fails_the_start_naming_base_url(mp_engine):
    with closed_port() as port:
        err = await node_error(mp_engine, chat(base_url=f"http://127.0.0.1:{port}/v1"))
    assert err.node_id == "llm" and err.context["field"] == "base_url", err.context
    assert f"cannot reach http://127.0.0.1:{port}/v1" in str(err), str(err)


async def test_a_server_that_does_not_answer_times_out_naming_timeout(mp_engine):
    with silent_server() as port:
        err = await node_error(mp_engine, chat(base_url=f"http://127.0.0.1:{port}/v1", timeout=0.5))
    assert err.node_id == "llm" and err.context["field"] == "timeout", err.context
    assert "did not answer within timeout=0.5 s" in str(err), str(err)


async def test_http_errors_name_the_field_to_fix(mp_engine, llama_server):
    wrong_path = await node_error(mp_engine, chat(base_url=f"{llama_server.url}/nope/v1"))
    assert wrong_path.context["field"] == "base_url" and wrong_path.context["status"] == 404, wrong_path.context
    named = await node_error(mp_engine, chat(base_url=f"{llama_server.url}/nope/v1", model="m"))
    assert (named.context["field"], named.context["status"]) == ("base_url", 404), named.context
    assert "answered HTTP 404" in str(named), str(named)  # the chat request's, at the first turn
    unknown = await node_error(mp_engine, chat(base_url=llama_server.base_url, model="no-such-model"))
    assert unknown.context["field"] == "model" and "does not serve model 'no-such-model'" in str(unknown), unknown
    too_long = await node_error(mp_engine, chat(base_url=llama_server.base_url, max_tokens=16),
                                text="word " * 5000)  # past the server's 2048-token context
    assert too_long.context["status"] == 400 and "answered HTTP 400" in str(too_long), too_long


async def test_the_key_from_params_or_the_environment_and_a_wrong_one_naming_api_key(monkeypatch):
    # node processes take the engine's environment when it starts them: set it before
    monkeypatch.setenv("TEST_OPENAI_CHAT_KEY", "right-key")
    with LocalLlamaServer(threads=1, api_key="right-key") as locked:
        async with probed_engine() as engine:
            err = await node_error(engine, chat(base_url=locked.base_url, api_key="wrong-key"))
            assert (err.node_id, err.context["field"], err.context["status"]) == ("llm", "api_key", 401), \
                err.context
            for key in ({"api_key": "right-key"}, {"api_key_env": "TEST_OPENAI_CHAT_KEY"}):
                result = await engine.execute(chat(base_url=locked.base_url, max_tokens=16, **key),
                                              {"llm": RuntimeData.text("Hello.")})
                assert said(result.all_outputs["llm"]), key


@pytest.mark.parametrize(("params", "field"), [
    ({"base_url": "127.0.0.1:8080/v1"}, "base_url"),  # no scheme
    ({"base_url": "ftp://127.0.0.1/v1"}, "base_url"),
    ({}, "base_url"),  # required
    ({"base_url": "http://127.0.0.1:8080/v1", "timeout": 0}, "timeout"),
    ({"base_url": "http://127.0.0.1:8080/v1", "max_tokens": 0}, "max_tokens"),
    ({"base_url": "http://127.0.0.1:8080/v1", "temperature": 3}, "temperature"),
    ({"base_url": "http://127.0.0.1:8080/v1", "api_key_env": "NOT A NAME"}, "api_key_env"),
])
async def test_bad_params_fail_validation_naming_the_field(mp_engine, params, field):
    with pytest.raises(ValidationError) as info:
        mp_engine.validate(chat(**params))
    first = info.value.issues[0]
    assert (first.node_id, first.field) == ("llm", field), info.value.issues


async def test_an_unset_key_variable_fails_validation(mp_engine):
    assert "TEST_OPENAI_CHAT_UNSET" not in os.environ
    with pytest.raises(ValidationError, match="TEST_OPENAI_CHAT_UNSET is not set") as info:
        mp_engine.validate(chat(base_url="http://127.0.0.1:8080/v1", api_key_env="TEST_OPENAI_CHAT_UNSET"))
    assert (info.value.issues[0].node_id, info.value.issues[0].field) == ("llm", "api_key_env")


def test_the_server_leaves_no_process_descriptor_or_port():
    fds = len(os.listdir("/proc/self/fd"))
    server = LocalLlamaServer(threads=1)
    server.start()
    pid, port = server.pid, int(server.url.rsplit(":", 1)[1])
    assert psutil.Process(pid).is_running()
    server.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "the server lives on"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert len(os.listdir("/proc/self/fd")) == fds, "the server's pipes or log were left open"
