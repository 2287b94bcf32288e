"""TLS, mutual TLS and bearer-token auth: real servers on port 0, the real client.

Certificates are made here with ``cryptography``: a CA, a server certificate for
localhost / 127.0.0.1 signed by it, a client certificate signed by it, and a second,
unrelated CA with a client certificate of its own. Covers accepted and refused
connections (with the status code each refusal must have), the token on every
MemoryBank rpc, the open health service, and `bankd serve` / `bankd info` flag checks.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bankd import cli
from bankd.serve.server import ServerConfig
from bankd_client import BankClient, Unauthenticated, Unavailable, tensors
from bankd_client.credentials import add_connection_flags, connection_options
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc

TOKEN = "s3cret-token_0123456789"
SERVICE = "bankd.v1.MemoryBank"


# -- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files under one folder: ca, server (signed by ca), client (signed by ca),
    other_ca and other_client (signed by other_ca)."""

    folder: Path

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.folder / f"{name.replace('_crt', '.crt').replace('_key', '.key')}"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = (name, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca:
        usage = dict(key_cert_sign=True, crl_sign=True, digital_signature=False)
    else:
        usage = dict(key_cert_sign=False, crl_sign=False, digital_signature=True)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
            **usage,
        ),
        critical=True,
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if issuer is not None:
        ski = issuer[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Any) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    for ca_name, client_name in (("ca", "client"), ("other_ca", "other_client")):
        ca_key = _key()
        ca = _cert(f"bankd test {ca_name}", ca_key, None, ca=True)
        _write(folder, ca_name, ca, ca_key)
        client_key = _key()
        _write(folder, client_name, _cert(client_name, client_key, (ca, ca_key)), client_key)
        if ca_name == "ca":
            server_key = _key()
            server = _cert("localhost", server_key, (ca, ca_key), server=True)
            _write(folder, "server", server, server_key)
    (folder / "token").write_text(TOKEN + "\n")
    return Pki(folder)


# -- helpers ---------------------------------------------------------------------------


def tls_config(pki: Pki, *, mutual: bool = False, token: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"tls_cert": str(pki.server_crt), "tls_key": str(pki.server_key)}
    if mutual:
        config["tls_client_ca"] = str(pki.ca_crt)
    if token:
        config["auth_token_file"] = str(pki.token)
    return config


def every_rpc(client: BankClient, bank: Any) -> dict[str, Callable[[], Any]]:
    """One call of each MemoryBank rpc that needs only a bank."""
    q = bank.queries(2, seed=5)
    return {
        "GetInfo": lambda: client.info(refresh=True),
        "Search": lambda: client.search(q, k=3),
        "SearchStream": lambda: list(client.stream_search([q, q], k=3)),
        "Fetch": lambda: client.fetch(bank.ids[:2]),
    }


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


@pytest.fixture
def serve(server_factory: Callable[..., Any], bank: Any) -> Callable[..., Any]:
    """serve(**security config): a started server over the shared bank, no Embed."""

    def start(**config: Any) -> Any:
        return server_factory(bank.path, no_embed=True, metrics_port=None, **config)

    return start


@pytest.fixture
def connect(client_factory: Callable[..., Any]) -> Callable[..., BankClient]:
    """connect(server, **BankClient options): a client with no retries (fast refusals)."""

    def make(server: Any, **kwargs: Any) -> BankClient:
        kwargs.setdefault("retry_attempts", 1)
        kwargs.setdefault("timeout", 10.0)
        return client_factory(server.port, **kwargs)

    return make


# -- TLS -------------------------------------------------------------------------------


def test_tls_accepted_with_the_right_ca(serve: Any, connect: Any, pki: Pki, bank: Any) -> None:
    server = serve(**tls_config(pki))
    client = connect(server, root_certificates=pki.ca_crt)
    assert client.info().entries == len(bank.ids)
    hits = client.search(bank.queries(2, seed=1), k=3, with_values=False)
    assert hits.ids.shape == (2, 3)


def test_tls_refused_with_the_wrong_ca(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**tls_config(pki))
    client = connect(server, root_certificates=pki.other_ca_crt)
    with pytest.raises(Unavailable):
        client.info()


def test_plaintext_client_cannot_talk_to_a_tls_server(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**tls_config(pki))
    with pytest.raises(Unavailable):
        connect(server).info()


def test_server_name_override(serve: Any, connect: Any, pki: Pki) -> None:
    """A certificate for "localhost" checked while connecting to 127.0.0.1 by that name."""
    server = serve(**tls_config(pki))
    client = connect(server, root_certificates=pki.ca_crt.read_bytes(), server_name="localhost")
    assert client.info().entries > 0
    wrong = connect(server, root_certificates=pki.ca_crt, server_name="bankd.example.com")
    with pytest.raises(Unavailable):
        wrong.info()


# -- mutual TLS ------------------------------------------------------------------------


def test_mtls_accepted_with_a_client_certificate(serve: Any, connect: Any, pki: Pki) -> None:
    server = serve(**tls_config(pki, mutual=True))
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
    server = serve(**tls_config(pki, mutual=True))
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
    serve: Any, connect: Any, pki: Pki, bank: Any, tls: bool
) -> None:
    config = tls_config(pki, token=True) if tls else {"auth_token_file": str(pki.token)}
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
    serve: Any, connect: Any, pki: Pki, bank: Any, tls: bool, token: str | None
) -> None:
    config = tls_config(pki, token=True) if tls else {"auth_token_file": str(pki.token)}
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
    server = serve(**tls_config(pki, token=True))
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_crt.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_health_port_beside_tls(serve: Any, pki: Pki, bank: Any) -> None:
    """--health-port: probes that cannot speak TLS get health, and nothing else."""
    server = serve(**tls_config(pki, mutual=True, token=True), health_port=0)
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
    server = serve(**tls_config(pki, mutual=True, token=True))
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
        serve(**tls_config(pki, mutual=True, token=True))
    text = caplog.text
    assert "mutual TLS, token auth on" in text
    assert TOKEN not in text


# -- configuration errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"tls_cert": "server.crt"}, "--tls-cert needs --tls-key"),
        ({"tls_key": "server.key"}, "--tls-key needs --tls-cert"),
        ({"tls_client_ca": "ca.crt"}, "--tls-client-ca (mutual TLS) needs --tls-cert"),
        ({"tls_cert": "missing.crt", "tls_key": "server.key"}, "--tls-cert {}/missing.crt"),
        ({"tls_cert": "server.crt", "tls_key": "client.key"}, "--tls-key {}/client.key"),
        ({"tls_cert": "ca.key", "tls_key": "server.key"}, "not a PEM certificate chain"),
        (
            {"tls_cert": "server.crt", "tls_key": "server.key", "tls_client_ca": "token"},
            "--tls-client-ca {}/token: not a PEM CA bundle",
        ),
        ({"auth_token_file": "empty"}, "--auth-token-file {}/empty is empty"),
        ({"auth_token_file": "missing"}, "--auth-token-file {}/missing: cannot read it"),
        ({"auth_token_file": "two_words"}, "one word of printable ASCII"),
    ],
)
def test_bad_security_config_fails_before_binding(
    pki: Pki, bank: Any, config: dict[str, str], message: str
) -> None:
    from bankd.serve.server import BankServer

    (pki.folder / "empty").write_text(" \n")
    (pki.folder / "two_words").write_text("two words\n")
    config = {k: str(pki.folder / v) for k, v in config.items()}
    with pytest.raises(ValueError) as e:
        BankServer(ServerConfig(index=str(bank.path), port=0, metrics_port=None, **config))
    assert message.format(pki.folder) in str(e.value)
    assert TOKEN not in str(e.value)


def test_serve_cli_exits_2_naming_the_file(
    pki: Pki, bank: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "token.txt"
    empty.write_text("")
    argv = ["serve", "--index", str(bank.path), "--port", "0", "--metrics-port", "-1"]
    assert cli.main([*argv, "--auth-token-file", str(empty)]) == 2
    assert f"bankd serve: --auth-token-file {empty} is empty" in capsys.readouterr().err
    assert cli.main([*argv, "--tls-cert", str(pki.server_crt)]) == 2
    assert "--tls-cert needs --tls-key" in capsys.readouterr().err


def test_info_cli_with_tls_and_token(
    serve: Any, pki: Pki, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(**tls_config(pki, mutual=True, token=True))
    argv = [
        "info",
        "--target",
        f"localhost:{server.port}",
        "--timeout",
        "10",
        "--tls-ca",
        str(pki.ca_crt),
        "--tls-cert",
        str(pki.client_crt),
        "--tls-key",
        str(pki.client_key),
    ]
    assert cli.main([*argv, "--auth-token-file", str(pki.token)]) == 0
    assert '"entries"' in capsys.readouterr().out
    assert cli.main(argv) == 2  # no token
    assert "missing bearer token" in capsys.readouterr().err
    assert cli.main(argv[:-2]) == 2  # a certificate without its key
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_token_file_from_the_environment(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("BANKD_TOKEN_FILE", str(pki.token))
    parser = argparse.ArgumentParser()
    add_connection_flags(parser, prefix="bank-")
    args = parser.parse_args(["--bank-tls-ca", str(pki.ca_crt)])
    assert connection_options(args, prefix="bank-") == {
        "root_certificates": str(pki.ca_crt),
        "token_file": str(pki.token),
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({"token": "a b"}, "one word of printable ASCII"),
        ({"token": "x", "token_file": "t"}, "token or token_file, not both"),
        ({"client_certificate": b"x"}, "client_certificate and client_key together"),
        ({"server_name": "localhost"}, "it needs TLS"),
        ({"root_certificates": "/nonexistent/ca.crt"}, "root_certificates /nonexistent"),
        ({"token_file": "/nonexistent/token"}, "token_file /nonexistent/token: cannot read"),
    ],
)
def test_client_option_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BankClient("127.0.0.1:1", **options)


def test_tinyalign_bank_flags_reach_the_client(serve: Any, pki: Pki, tmp_path: Path) -> None:
    """`tinyalign pretrain --bank ... --bank-tls-* --bank-auth-token-file --bank-lb-policy`
    -> TrainConfig -> the BankClient that training opens, against an mTLS + token server."""
    from tinyalign.cli import build_parser, config_from_args
    from tinyalign.config import open_checked_bank

    server = serve(**tls_config(pki, mutual=True, token=True))
    args = build_parser().parse_args(
        [
            "pretrain",
            "--data",
            str(tmp_path / "data.json"),
            "--out",
            str(tmp_path / "run"),
            "--bank",
            f"127.0.0.1:{server.port}",
            "--bank-tls-ca",
            str(pki.ca_crt),
            "--bank-tls-cert",
            str(pki.client_crt),
            "--bank-tls-key",
            str(pki.client_key),
            "--bank-tls-server-name",
            "localhost",
            "--bank-auth-token-file",
            str(pki.token),
            "--bank-lb-policy",
            "round_robin",
        ]
    )
    config = config_from_args(args)
    assert config.bank_auth_token_file == str(pki.token) and TOKEN not in config.to_json()
    options = connection_options(config, prefix="bank_")
    assert options["load_balancing"] == "round_robin"
    bank = open_checked_bank(config.bank, 10.0, **options)
    try:
        assert bank.info().entries > 0
    finally:
        bank.close()


def test_security_repr_hides_the_token(pki: Pki) -> None:
    from bankd.serve.security import ServerSecurity

    security = ServerSecurity.from_files(auth_token_file=str(pki.token))
    assert security.token == TOKEN
    assert TOKEN not in repr(security) and TOKEN not in security.describe()


def test_replicas_with_mtls_and_token(serve: Any, pki: Pki, bank: Any) -> None:
    """Round-robin over two replicas behind one target, mutual TLS and a token on each."""
    servers = [serve(**tls_config(pki, mutual=True, token=True)) for _ in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    client = BankClient(
        target,
        timeout=10,
        load_balancing="round_robin",
        root_certificates=pki.ca_crt,
        client_certificate=pki.client_crt,
        client_key=pki.client_key,
        token_file=pki.token,
        server_name="localhost",  # the target names no host to check the certificate for
    )
    with client:
        client.wait_ready(timeout=10)
        for name, call in every_rpc(client, bank).items():
            for _ in range(4):
                assert call() is not None, name
    for s in servers:
        answered = s.metrics.registry.get_sample_value(
            "bankd_requests_total", {"method": "Search", "code": "OK"}
        )
        assert answered and answered >= 1


def test_tls_to_an_address_list_needs_server_name(pki: Pki) -> None:
    with pytest.raises(ValueError, match="several addresses and no host name: give server_name"):
        BankClient("ipv4:127.0.0.1:1,127.0.0.1:2", root_certificates=pki.ca_crt)
