"""gRPC server reflection, both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha. Current clients (grpcurl, Postman,
grpcui) ask v1 first; the two protocols are the same messages under another
package, so the v1 service is the same servicer behind a second name, and its
file descriptor (v1alpha's, renamed) is added to the pool so it can be
described too.

Symbols: protobuf's pool finds files by message, enum and service names but
not by a method, field or enum value (`remotemedia.v1.PipelineExecutionService.GetVersion`,
what `grpcurl describe` asks); a symbol not found is retried without its last
component, as the reflection spec allows (any file that defines it).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2
from grpc_reflection.v1alpha.reflection import SERVICE_NAME as V1ALPHA_SERVICE_NAME

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = f.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace("v1alpha", "v1")
        method.output_type = method.output_type.replace("v1alpha", "v1")
    proto.options.Clear()
    pool.Add(proto)


class ReflectionServicer(_async.ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        name = fully_qualified_name
        while True:
            resp = super()._file_containing_symbol(request, name)
            if not resp.HasField("error_response") or "." not in name:
                return resp
            name = name.rsplit(".", 1)[0]


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) for `service_names` on `server`."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = ReflectionServicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME), pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),))


__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable"]
