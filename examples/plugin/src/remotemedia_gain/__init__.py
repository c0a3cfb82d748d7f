"""remotemedia-gain: an example node plugin for remotemedia-engine (see README.md)."""

from .nodes import GainNode

__all__ = ["GainNode"]
