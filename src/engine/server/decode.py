"""Registering the servicers with request decoding that survives garbage.

grpc decodes each request before the servicer sees it; a body that is not
the message (DecodeError) would surface as UNKNOWN "Unexpected <class
DecodeError>" with a traceback logged per call. Here a request that does
not decode becomes a `Malformed` value instead: a unary call answers
INVALID_ARGUMENT (one log line); a stream gets a VALIDATION error message
naming the message type, then ends with INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from ..errors import ValidationError

log = logging.getLogger("engine.server")


@dataclass(frozen=True)
class Malformed:
    """A request body that is not a valid `type_name`."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"malformed request: not a valid {self.type_name} ({self.reason})"


def _tolerant(cls: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc).split(": ")[-1])

    return decode


def _unary(method: Callable, name: str) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            log.warning("%s: %s (from %s)", name, request.message, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def _streaming(method: Callable) -> Callable:
    async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bad: list[Malformed] = []

        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    bad.append(request)
                    raise ValidationError(request.message)  # the call answers it (and logs it once)
                yield request

        async for response in method(checked(), context):
            yield response
        if bad:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(bad[0].message)

    return handler


def add_servicer(server: grpc.aio.Server, servicer: Any, service: Any) -> None:
    """Register `servicer`'s methods for the service descriptor `service` (unary→unary and stream→stream)."""
    handlers = {}
    for m in service.methods:
        decode = _tolerant(message_factory.GetMessageClass(m.input_type))
        encode = message_factory.GetMessageClass(m.output_type).SerializeToString
        method = getattr(servicer, m.name)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(method), request_deserializer=decode, response_serializer=encode)
        elif not m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(method, m.name), request_deserializer=decode, response_serializer=encode)
        else:  # pragma: no cover - remotemedia.v1 has no such method
            raise NotImplementedError(f"{m.full_name}: only unary and bidirectional calls are served")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
