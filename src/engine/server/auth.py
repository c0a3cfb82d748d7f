"""Bearer-key authentication for every RPC except health checks.

Keys are compared in constant time (hmac.compare_digest against each
configured key, all of them checked) and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger("engine.server")

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def key_matches(presented: str, keys: Sequence[bytes]) -> bool:
    candidate = presented.encode()
    ok = False
    for key in keys:  # no early exit: timing does not tell which key matched
        ok |= hmac.compare_digest(candidate, key)
    return ok


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        reason = self._reject_reason(details.invocation_metadata or ())
        if reason is None:
            return handler
        log.info("rejected %s: %s", details.method, reason)
        return _denied(handler, reason)

    def _reject_reason(self, metadata: Sequence[Any]) -> str | None:
        values = [m.value for m in metadata if m.key == "authorization"]
        if not values:
            return "missing authorization metadata (expected 'authorization: Bearer <key>')"
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "authorization metadata must be 'Bearer <key>'"
        if not key_matches(token.strip(), self._keys):
            return "invalid API key"
        return None


def _denied(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def abort(_request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
