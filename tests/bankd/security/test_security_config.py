"""Security configuration: a bad TLS or token config refused before binding, naming the
file; `bankd serve` / `bankd info` / `tinyalign --bank-*` flags reaching the client;
client option errors; the token kept out of reprs; replicas behind one TLS target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from certificates import TOKEN, Pki

from bankd import cli
from bankd.serve.server import ServerConfig
from bankd_client import BankClient
from bankd_client.credentials import add_connection_flags, connection_options

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
    server = serve(**pki.tls_config(mutual=True, token=True))
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

    server = serve(**pki.tls_config(mutual=True, token=True))
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


def test_replicas_with_mtls_and_token(serve: Any, pki: Pki, bank: Any, every_rpc: Any) -> None:
    """Round-robin over two replicas behind one target, mutual TLS and a token on each."""
    servers = [serve(**pki.tls_config(mutual=True, token=True)) for _ in range(2)]
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
