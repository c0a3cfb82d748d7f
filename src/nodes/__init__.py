"""Built-in node implementations (package `nodes`)."""

from __future__ import annotations

from engine.node import Node


def builtin_nodes() -> list[type[Node]]:
    from .audio import AudioChunkerNode, AudioFormatNode, AudioResampleNode
    from .basic import PassThroughNode

    return [PassThroughNode, AudioChunkerNode, AudioResampleNode, AudioFormatNode]


def test_nodes() -> list[type[Node]]:
    """Nodes for tests and benchmarks; registered only when test nodes are enabled."""
    from .testing import ChecksumNode, CpuBurnNode, CrashNode, EchoNode, SleepNode, SlowInitNode

    return [EchoNode, SleepNode, CpuBurnNode, CrashNode, SlowInitNode, ChecksumNode]
