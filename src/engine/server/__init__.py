"""The remotemedia.v1 gRPC service: servicers, auth, health, metrics."""

from .app import EngineServer, serve

__all__ = ["EngineServer", "serve"]
