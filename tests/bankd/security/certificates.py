"""The certificates and the token the security tests serve and connect with, made here
with ``cryptography``: a CA, a server certificate for localhost / 127.0.0.1 signed by
it, a client certificate signed by it, and a second, unrelated CA with a client
certificate of its own. Imported by the tests next to it (their folder is on the path).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN = "s3cret-token_0123456789"


@dataclass(frozen=True)
class Pki:
    """PEM files under one folder: ca, server (signed by ca), client (signed by ca),
    other_ca and other_client (signed by other_ca)."""

    folder: Path

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.folder / f"{name.replace('_crt', '.crt').replace('_key', '.key')}"

    def tls_config(self, *, mutual: bool = False, token: bool = False) -> dict[str, Any]:
        """ServerConfig fields of a server with this certificate (and, with mutual, that
        asks clients for one signed by ca; with token, that wants the bearer token)."""
        config: dict[str, Any] = {"tls_cert": str(self.server_crt), "tls_key": str(self.server_key)}
        if mutual:
            config["tls_client_ca"] = str(self.ca_crt)
        if token:
            config["auth_token_file"] = str(self.token)
        return config


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


def make_pki(folder: Path) -> Pki:
    """A CA, a server and a client certificate signed by it, an unrelated CA with a client
    certificate of its own, and the token file, written under folder."""
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
