"""`openai_llm`: a reply's first phrase through OpenAIChatNode (HTTP to llama.cpp's
server in another process) against LlamaCppNode (llama.cpp in the node's process),
the same bundled SmolLM2, the same questions, in the same run.

Both answer greedily with the same prompt, so the difference is what the HTTP
hop costs: the request, the server's scheduling, the SSE stream and the
client's parsing. Questions alternate between the two nodes so that load
from elsewhere falls on both alike. `BENCH_OPENAI_LLM_N` sets how many
questions each node answers (default 30).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from bench.harness import pct, scenario
from engine import Engine, RuntimeData
from nodes.speech.llama_server import LocalLlamaServer

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What color is the sky on a sunny day?", "What do bees make from flowers?",
             "Name three colors.", "What is two plus two?", "Where do penguins live?",
             "What is the largest planet?", "How many days are in a week?", "What do cows drink?"]
THREADS = 2


def _doc(node_type: str, **params: Any) -> dict:
    return {"version": "v1", "metadata": {"name": f"openai-llm-{node_type}"},
            "nodes": [{"id": "llm", "node_type": node_type, "params": {
                "max_tokens": 48, "first_phrase_max_words": 4, "history_turns": 0, **params}}],
            "connections": []}


async def _first_phrases(engine: Engine, docs: dict[str, dict], n: int) -> dict[str, list[float]]:
    """Seconds from a question sent to its reply's first phrase, per node, questions alternating."""
    out: dict[str, list[float]] = {label: [] for label in docs}
    async with contextlib.AsyncExitStack() as stack:  # each session cancelled on the way out
        sessions = {label: await stack.enter_async_context(engine.stream(doc)) for label, doc in docs.items()}
        for i in range(n + 2):  # the first two answers warm both up
            for label, session in sessions.items():
                t0 = time.perf_counter()
                await session.send("llm", RuntimeData.text(QUESTIONS[i % len(QUESTIONS)]))
                first = None
                async for o in session:
                    first = first if first is not None else time.perf_counter() - t0
                    if o.data.metadata.get("final") == "1":
                        break
                if i >= 2 and first is not None:
                    out[label].append(first)
    return out


@scenario("openai_llm")
def openai_llm() -> dict:
    import uvloop

    n = int(os.environ.get("BENCH_OPENAI_LLM_N", "30"))
    with LocalLlamaServer(threads=THREADS) as server:
        docs = {"LlamaCppNode (in its process)": _doc("LlamaCppNode", threads=THREADS),
                "OpenAIChatNode (HTTP, llama.cpp server)": _doc("OpenAIChatNode", base_url=server.base_url)}

        async def run() -> dict[str, list[float]]:
            engine = Engine({})
            await engine.start()
            try:
                return await _first_phrases(engine, docs, n)
            finally:
                await engine.aclose()

        times = uvloop.run(run())
    series = {f"{label}: question → first phrase": {"values": v, "unit": "s"} for label, v in times.items()}
    local, remote = (times[k] for k in docs)
    return {
        "series": series,
        "derived": {"HTTP hop at p50 (ms)": (pct(remote, .5) - pct(local, .5)) * 1000},
        "notes": f"{n} questions each, alternating; SmolLM2-135M Q4_1, {THREADS} threads on either side, "
                 "greedy, max_tokens 48, first phrase ≤ 4 words, no history. The server is xllamacpp's "
                 "(llama.cpp's llama-server) in a child process on 127.0.0.1.",
    }
