"""What an operator meets: reflection (v1 and v1alpha) through real clients, TLS and
mutual TLS with certificates made here, a typed error for a batch run without input."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_client import proto_manifest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tlscerts import CertAuthority

from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc

METHOD = "remotemedia.v1.PipelineExecutionService.GetVersion"


def _describe_with_v1alpha_client(address: str) -> tuple[set[str], str]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        services = set(db.get_services())
        method = pool.FindMethodByName(METHOD)
        return services, method.input_type.full_name


def _describe_with_v1_client(address: str) -> tuple[set[str], list[str]]:
    # a client of grpc.reflection.v1 built from that protocol's descriptor (as grpcurl is)
    default = descriptor_pool.Default()
    request_cls = message_factory.GetMessageClass(
        default.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response_cls = message_factory.GetMessageClass(
        default.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=request_cls.SerializeToString,
                                     response_deserializer=response_cls.FromString)
        requests = [request_cls(list_services=""), request_cls(file_containing_symbol=METHOD)]
        listed, found = call(iter(requests))
    files = []
    for raw in found.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files.append(proto.name)
        if proto.name == "execution.proto":
            service = next(s for s in proto.service if s.name == "PipelineExecutionService")
            assert "GetVersion" in [m.name for m in service.method]
    return {s.name for s in listed.list_services_response.service}, files


async def test_reflection_v1_and_v1alpha_describe_a_method(server):
    services, input_type = await asyncio.to_thread(_describe_with_v1alpha_client, server.address)
    assert {"remotemedia.v1.PipelineExecutionService", "remotemedia.v1.StreamingPipelineService",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.health.v1.Health"} <= services
    assert input_type == "remotemedia.v1.VersionRequest"
    services_v1, files = await asyncio.to_thread(_describe_with_v1_client, server.address)
    assert services_v1 == services
    assert "execution.proto" in files and "common.proto" in files


async def test_reflection_describes_the_v1_reflection_service_itself(server):
    def describe() -> list[str]:
        with grpc.insecure_channel(server.address) as channel:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            service = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
            return [m.full_name for m in service.methods]

    assert await asyncio.to_thread(describe) == ["grpc.reflection.v1.ServerReflection.ServerReflectionInfo"]


async def test_batch_run_without_input_for_its_sources_is_a_validation_error(channel):
    stub = epb_grpc.PipelineExecutionServiceStub(channel)
    manifest = proto_manifest([("mic", "PassThroughNode"), ("cam", "PassThroughNode"), ("mix", "PassThroughNode")],
                              [("mic", "mix"), ("cam", "mix")])
    resp = await stub.ExecutePipeline(epb.ExecuteRequest(manifest=manifest))
    assert resp.WhichOneof("outcome") == "error"
    assert resp.error.error_type == pb.ERROR_TYPE_VALIDATION
    assert "'mic'" in resp.error.message and "'cam'" in resp.error.message
    assert "no input for source node" in resp.error.message
    req = epb.ExecuteRequest(manifest=manifest)
    req.data_inputs["mic"].text.text_data = b"hi"
    resp = await stub.ExecutePipeline(req)
    assert resp.WhichOneof("outcome") == "error" and resp.error.failing_node_id == "cam"


# ------------------------------------------------------------------ TLS


async def _version(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        stub = epb_grpc.PipelineExecutionServiceStub(channel)
        resp = await stub.GetVersion(epb.VersionRequest(client_version="v1"), timeout=5)
        return resp.version_info.protocol_version


async def test_tls(make_server, tmp_path):
    ca = CertAuthority(tmp_path)
    cert, key = ca.issue("server", server=True)
    srv = await make_server(server={"tls_cert_file": str(cert), "tls_key_file": str(key)})
    trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert_file.read_bytes())
    assert await _version(srv.address, trusted) == "v1"
    with pytest.raises(grpc.aio.AioRpcError) as plain:
        await _version(srv.address, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = CertAuthority(tmp_path, "other-ca")
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await _version(srv.address, grpc.ssl_channel_credentials(root_certificates=stranger.cert_file.read_bytes()))
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls(make_server, tmp_path):
    ca = CertAuthority(tmp_path)
    cert, key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    srv = await make_server(server={"tls_cert_file": str(cert), "tls_key_file": str(key),
                                    "tls_client_ca_file": str(ca.cert_file)})
    root = ca.cert_file.read_bytes()
    with_cert = grpc.ssl_channel_credentials(root_certificates=root, private_key=client_key.read_bytes(),
                                             certificate_chain=client_cert.read_bytes())
    assert await _version(srv.address, with_cert) == "v1"
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await _version(srv.address, grpc.ssl_channel_credentials(root_certificates=root))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_settings_that_cannot_work_are_named(make_server, tmp_path):
    from engine.errors import ValidationError
    from engine.server import EngineServer

    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file go together"):
        EngineServer({"server": {"tls_cert_file": "x.pem"}})
    srv = EngineServer({"server": {"tls_cert_file": str(tmp_path / "none.pem"),
                                   "tls_key_file": str(tmp_path / "none.key")}}, port=0)
    with pytest.raises(ValidationError, match=r"server.tls_key_file.*cannot read .*none.key: No such file"):
        await srv.start()


def test_tls_files_in_a_runtime_toml_are_taken_from_its_directory(tmp_path):
    from engine.config import RuntimeConfig

    (tmp_path / "runtime.toml").write_text('[server]\ntls_cert_file = "certs/server.pem"\n'
                                           'tls_key_file = "/etc/keys/server.key"\n')
    cfg = RuntimeConfig.load(tmp_path / "runtime.toml", env={})
    assert cfg.server.tls_cert_file == str(tmp_path / "certs" / "server.pem")
    assert cfg.server.tls_key_file == "/etc/keys/server.key"
