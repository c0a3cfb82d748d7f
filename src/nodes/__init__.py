"""Built-in node implementations (package `nodes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the package itself loads no engine module
    from engine.node import Node

#: engine.catalog checks this to tell the built-in package from a module of the
#: same name that hides it (an app's own nodes.py)
REMOTEMEDIA_BUILTIN_NODES = True


def builtin_nodes() -> list[type[Node]]:
    from .audio import AudioChunkerNode, AudioFormatNode, AudioResampleNode, FastResampleNode
    from .basic import PassThroughNode
    from .speech.accumulator import AudioBufferAccumulatorNode
    from .speech.kokoro import KokoroTTSNode
    from .speech.lfm2_audio import LFM2AudioNode
    from .speech.llm import LFM2Node, LlamaCppNode
    from .speech.openai_chat import OpenAIChatNode
    from .speech.tts import PiperTTSNode
    from .speech.vad import SileroVADNode
    from .speech.vibevoice import VibeVoiceTTSNode
    from .speech.whisper import WhisperNode
    from .text import TextCollectorNode

    return [PassThroughNode, AudioChunkerNode, AudioResampleNode, FastResampleNode, AudioFormatNode,
            TextCollectorNode, SileroVADNode, AudioBufferAccumulatorNode, WhisperNode, LlamaCppNode, LFM2Node,
            OpenAIChatNode, PiperTTSNode, KokoroTTSNode, LFM2AudioNode, VibeVoiceTTSNode]


def test_nodes() -> list[type[Node]]:
    """Nodes for tests and benchmarks; registered only when test nodes are enabled."""
    from .testing import (
        ChecksumNode,
        CpuBurnNode,
        CrashNode,
        EchoNode,
        GenerateNode,
        HoldNode,
        InitProbeNode,
        SleepNode,
        SlowInitNode,
        TurnProbeNode,
    )

    return [EchoNode, SleepNode, CpuBurnNode, CrashNode, SlowInitNode, ChecksumNode, GenerateNode, HoldNode,
            TurnProbeNode, InitProbeNode]
