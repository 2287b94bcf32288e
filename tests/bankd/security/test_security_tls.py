"""TLS, mutual TLS and bearer-token auth: real servers on port 0, the real client.

Covers accepted and refused connections (with the status code each refusal must have),
the token on every MemoryBank rpc, the open health service, and what the start-up log
says. Certificates: ``certificates.py``; configuration errors and the command-line
flags: test_security_config.py.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from certificates import TOKEN, Pki
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bankd_client import Unauthenticated, Unavailable, tensors
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc

SERVICE = "bankd.v1.MemoryBank"


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


# -- TLS -------------------------------------------------------------------------------


def test_tls_accepted_with_the_right_ca(serve: Any, connect: Any, pki: Pki, bank: Any) -> None:
    server = serve(**pki.tls_config())
    client = connect(server, root_certificates=pki.ca_crt)
    assert client.info().entries == len(bank.ids)
    hits = client.search(bank.queries(2, seed=1), k=3, with_values=False)
    assert hits.ids.shape == (2, 3)


def test_tls_refused_with_the_wrong_ca(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**pki.tls_config())
    client = connect(server, root_certificates=pki.other_ca_crt)
    with pytest.raises(Unavailable):
        client.info()


def test_plaintext_client_cannot_talk_to_a_tls_server(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**pki.tls_config())
    with pytest.raises(Unavailable):
        connect(server).info()


def test_server_name_override(serve: Any, connect: Any, pki: Pki) -> None:
    """A certificate for "localhost" checked while connecting to 127.0.0.1 by that name."""
    server = serve(**pki.tls_config())
    client = connect(server, root_certificates=pki.ca_crt.read_bytes(), server_name="localhost")
    assert client.info().entries > 0
    wrong = connect(server, root_certificates=pki.ca_crt, server_name="bankd.example.com")
    with pytest.raises(Unavailable):
        wrong.info()


# -- mutual TLS ------------------------------------------------------------------------


def test_mtls_accepted_with_a_client_certificate(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**pki.tls_config(mutual=True))
    client = connect(
        server,
        root_certificates=pki.ca_crt,
        client_certificate=pki.client_crt,
        client_key=pki.client_key,
    )
    assert client.info().entries > 0


@pytest.mark.parametrize("client_cert", [None, "other_client"])
def test_mtls_refused_without_a_trusted_client_certificate(
    serve: Any, connect: Any, pki: Pki, client_cert: str | None
) -> None:
    server = serve(**pki.tls_config(mutual=True))
    options: dict[str, Any] = {"root_certificates": pki.ca_crt}
    if client_cert:
        options.update(
            client_certificate=pki.folder / f"{client_cert}.crt",
            client_key=pki.folder / f"{client_cert}.key",
        )
    with pytest.raises(Unavailable):
        connect(server, **options).info()


# -- bearer token ----------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_token_accepted_on_every_rpc(
    serve: Any, connect: Any, pki: Pki, bank: Any, tls: bool, every_rpc: Any
) -> None:
    config = pki.tls_config(token=True) if tls else {"auth_token_file": str(pki.token)}
    server = serve(**config)
    options = {"root_certificates": pki.ca_crt} if tls else {}
    by_value = connect(server, token=TOKEN, **options)
    by_file = connect(server, token_file=pki.token, **options)
    for client in (by_value, by_file):
        for name, call in every_rpc(client, bank).items():
            assert call() is not None, name


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]])
def test_token_refused_when_missing_or_wrong(
    serve: Any, connect: Any, pki: Pki, bank: Any, tls: bool, token: str | None, every_rpc: Any
) -> None:
    config = pki.tls_config(token=True) if tls else {"auth_token_file": str(pki.token)}
    server = serve(**config)
    options = {"root_certificates": pki.ca_crt} if tls else {}
    client = connect(server, token=token, **options)
    for name, call in every_rpc(client, bank).items():
        with pytest.raises(Unauthenticated) as e:
            call()
        expected = "missing bearer token" if token is None else "invalid bearer token"
        assert expected in e.value.message, name
        assert TOKEN not in e.value.message


def test_token_refusals_are_counted(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(auth_token_file=str(pki.token))
    with pytest.raises(Unauthenticated):
        connect(server).info()
    value = server.metrics.registry.get_sample_value(
        "bankd_requests_total", {"method": "GetInfo", "code": "UNAUTHENTICATED"}
    )
    assert value == 1


@pytest.mark.parametrize(
    "metadata",
    [("authorization", "Basic " + TOKEN), ("authorization", "Bearer"), ("x-token", TOKEN)],
)
def test_token_must_come_as_a_bearer_authorization(
    serve: Any, pki: Pki, metadata: tuple[str, str]
) -> None:
    server = serve(auth_token_file=str(pki.token))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.MemoryBankStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.GetInfoRequest(), metadata=[metadata], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.GetInfo(
            pb.GetInfoRequest(), metadata=[("authorization", f"bearer {TOKEN}")], timeout=10
        )
        assert ok.entries > 0


def test_health_and_reflection_need_no_token(serve: Any, pki: Pki) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = serve(auth_token_file=str(pki.token))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
        assert SERVICE in {s.name for s in answer.list_services_response.service}


def test_health_over_tls_needs_no_token(serve: Any, pki: Pki) -> None:
    server = serve(**pki.tls_config(token=True))
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_crt.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_health_port_beside_tls(serve: Any, pki: Pki, bank: Any) -> None:
    """--health-port: probes that cannot speak TLS get health, and nothing else."""
    server = serve(**pki.tls_config(mutual=True, token=True), health_port=0)
    assert server.health_port and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        search = pb_grpc.MemoryBankStub(channel).Search
        request = pb.SearchRequest(keys=tensors.encode(bank.queries(1, seed=0)), k=1)
        with pytest.raises(grpc.RpcError) as refused:
            search(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    server.health.enter_graceful_shutdown()  # what SIGTERM does first: seen there too
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # still TLS only
        with pytest.raises(grpc.RpcError):
            health_status(channel)


def test_client_wait_ready_with_token_and_mtls(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**pki.tls_config(mutual=True, token=True))
    client = connect(
        server,
        root_certificates=pki.ca_crt,
        client_certificate=pki.client_crt,
        client_key=pki.client_key,
        token_file=pki.token,
    )
    client.wait_ready(timeout=10)
    assert client.info().entries > 0


def test_start_up_log_says_what_is_on_and_never_the_token(
    serve: Any, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bankd.serve.server"):
        serve(**pki.tls_config(mutual=True, token=True))
    text = caplog.text
    assert "mutual TLS, token auth on" in text
    assert TOKEN not in text
