"""The voice loop on questions and voices it was never tuned on (bench.matrix), with the real
models over gRPC: a soft final consonant, a comma and a pause inside the sentence are answered
once, from the whole question; a stream that ends after the question is answered; six
conversations at once each get their own answer. (Latency belongs to `python -m bench voice_matrix`.)"""

from __future__ import annotations

import asyncio

import pytest
from voice_call import VoiceCall

from bench.matrix import VOICES, Cell, Question, Voice, say, stream_of
from bench.scenarios_matrix import whole_transcripts
from bench.scenarios_speech import voice_manifest
from nodes.speech.spoken import wer, words

pytestmark = pytest.mark.speech

US, GB, US_F, RP_F = VOICES[:4]


def _cell(text: str, voice: Voice, noisy: bool = False, pause_at: float | None = None,
          trailing_s: float = 1.0) -> Cell:
    q = Question(text, pause_at=pause_at)
    return Cell(q, voice, noisy, trailing_s, stream_of(text, say(q, voice), trailing_s, noisy))


#: the questions, as a test asks them
SOFT_COMMA_PAUSE = [
    ("What is the capital of France?", US, False, None, 1.0),  # the VAD's pause began inside "France"
    ("Hello, can you hear me?", US, False, None, 1.0),  # "hello" alone looks like a finished turn
    ("How many legs does a spider have?", GB, False, 0.5, 1.0),
    ("Why does light bend in glass?", US_F, True, None, 1.0),
]
#: six questions each voice says right as a whole (bench.matrix's sequential baseline)
AT_ONCE = [("Where do penguins live?", US, False, None, 1.0), ("Tell me something about Paris.", GB, False, None, 1.0),
           ("Why does light bend in glass?", US_F, False, None, 1.0),
           ("Can you name a yellow fruit?", US, False, None, 1.0), ("Name a big city in Texas.", GB, False, None, 1.0),
           ("What is two plus three?", US_F, False, None, 1.0)]
ENDED = ("What do bees make?", RP_F, False, None, 0.3)


@pytest.fixture(scope="module", autouse=True)
def heard_whole():
    """Each question as the sequential loop hears it (Whisper on the whole utterance), worked out
    before any leak-checked fixture takes its snapshot."""
    cells = [_cell(*c) for c in (*SOFT_COMMA_PAUSE, *AT_ONCE)]
    return dict(zip((c.label for c in cells), whole_transcripts(cells, voice_manifest()), strict=True))


def _from_the_whole(cell: Cell, transcript: str, whole: str) -> None:
    """The reply answers all the words the whole utterance holds (a word may be heard otherwise:
    Whisper's words change with the audio around them)."""
    q = cell.question.text
    assert len(words(transcript)) >= len(words(whole)), f"{cell.label}: answered the cut {transcript!r} ({whole!r})"
    assert wer(q, transcript) <= wer(q, whole) + 0.15, f"{cell.label}: answered {transcript!r} ({whole!r})"


async def _ask(call: VoiceCall, cell: Cell) -> tuple[list[str], str]:
    """(the turns that answered it, the words the first one answers)."""
    start = await call.say(cell.spoken.audio)
    await call.silence_until(lambda: call.played_out(start), f"a reply to {cell.label}", limit_s=30)
    turns = call.turns(after=start)
    return turns, call.reply(turns[0])[2]


async def test_a_soft_ending_a_comma_and_a_pause_are_answered_once_from_the_whole_question(channel, heard_whole):
    async with VoiceCall(channel, voice_manifest()) as call:
        await call.silence(0.3)
        for cell in map(_cell, *zip(*SOFT_COMMA_PAUSE, strict=True)):
            turns, transcript = await _ask(call, cell)
            assert len(turns) == 1, f"{cell.label} answered in {len(turns)} turns"
            _from_the_whole(cell, transcript, heard_whole[cell.label])
        await call.close()
    assert not call.events(), "nothing was interrupted"


async def test_a_question_then_the_end_of_the_stream_is_answered(channel):
    cell = _cell(*ENDED)
    async with VoiceCall(channel, voice_manifest()) as call:
        await call.silence(0.3)
        end = await call.say(cell.spoken.audio) + cell.spoken.end_s
        responses = await call.close()  # no more audio: the turn ends with the stream
    assert responses[-1].WhichOneof("response") == "closed"
    assert call.audio(after=end - 0.5), "no reply"
    assert wer(cell.question.text, call.reply(call.turns()[0])[2]) <= 0.25


async def test_six_conversations_at_once_each_get_their_own_answer(channel, heard_whole):
    cells = [_cell(*c) for c in AT_ONCE]
    texts = [c.question.text for c in cells]

    async def one(cell, delay_s: float) -> str:
        async with VoiceCall(channel, voice_manifest()) as call:
            await call.silence(0.3 + delay_s)
            turns, transcript = await _ask(call, cell)
            assert len(turns) == 1, f"{cell.label} answered in {len(turns)} turns"
            await call.close()
        return transcript

    heard = await asyncio.gather(*(one(c, 0.5 * i) for i, c in enumerate(cells)))
    for cell, transcript in zip(cells, heard, strict=True):
        _from_the_whole(cell, transcript, heard_whole[cell.label])
        own = wer(cell.question.text, transcript)
        assert all(own < wer(other, transcript) for other in texts if other != cell.question.text), \
            f"{cell.label} was answered with another conversation's words: {transcript!r}"
