"""Transport security and bearer-token auth of `bankd serve`.

    security = ServerSecurity.from_files(tls_cert=..., tls_key=..., tls_client_ca=...,
                                         auth_token_file=...)    # ValueError names the file
    grpc.server(..., interceptors=security.interceptors(metrics))
    server.add_secure_port(address, security.credentials)        # or insecure when None

TLS: the server presents ``--tls-cert`` / ``--tls-key``; with ``--tls-client-ca`` every
client must present a certificate signed by that CA (mutual TLS). Token auth: every
MemoryBank call must carry ``authorization: Bearer <token>``; the token is read once at
start from ``--auth-token-file`` and compared in constant time. The standard health
service and reflection stay open, so probes and grpcurl's ``list`` need no token.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bankd_client.credentials import read_file, read_token_file
from bankd_client.proto import bankd_pb2 as pb

PROTECTED_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name + "/"


@dataclass(frozen=True)
class ServerSecurity:
    """What the server enforces; built from files, validated before anything binds."""

    credentials: grpc.ServerCredentials | None = None  # None: plaintext
    mutual_tls: bool = False
    token: str | None = field(default=None, repr=False)  # never in a log line

    @classmethod
    def from_files(
        cls,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
        auth_token_file: str | None = None,
    ) -> ServerSecurity:
        if (tls_cert is None) != (tls_key is None):
            given, missing = (
                ("--tls-cert", "--tls-key") if tls_cert else ("--tls-key", "--tls-cert")
            )
            raise ValueError(f"{given} needs {missing}: TLS takes a certificate and its key")
        if tls_client_ca is not None and tls_cert is None:
            raise ValueError(
                "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: "
                "the server must speak TLS to check client certificates"
            )
        credentials = None
        if tls_cert is not None and tls_key is not None:
            cert = read_file(tls_cert, flag="--tls-cert")
            key = read_file(tls_key, flag="--tls-key")
            _check_key_pair(tls_cert, tls_key)
            client_ca = None
            if tls_client_ca is not None:
                client_ca = read_file(tls_client_ca, flag="--tls-client-ca")
                _check_ca_bundle(tls_client_ca)
            credentials = grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
        token = None
        if auth_token_file is not None:
            token = read_token_file(auth_token_file, flag="--auth-token-file")
        return cls(credentials, tls_client_ca is not None, token)

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def describe(self) -> str:
        """One line for the start-up log; never contains the token."""
        transport = "mutual TLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"
        return f"{transport}, token auth {'on' if self.token else 'off'}"

    def interceptors(self, metrics: Any = None) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token, metrics)] if self.token else []


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for MemoryBank calls without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, metrics: Any = None) -> None:
        self._expected = token.encode("ascii")
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(PROTECTED_PREFIX):  # health, reflection: open
            return continuation(details)
        problem = self._check(details.invocation_metadata)
        handler = continuation(details)
        if problem is None or handler is None:
            return handler
        if self._metrics is not None:
            name = method[len(PROTECTED_PREFIX) :]
            self._metrics.requests.labels(method=name, code="UNAUTHENTICATED").inc()
        return _refusal(handler, problem)

    def _check(self, metadata: Any) -> str | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        scheme, _, credential = str(values[-1]).partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        # Constant time, and on bytes: a non-ASCII credential cannot match, and must
        # not raise either.
        if not hmac.compare_digest(credential.strip().encode("utf-8"), self._expected):
            return "invalid bearer token"
        return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _check_key_pair(cert: str, key: str) -> None:
    """Parse the PEM certificate chain and key now, so a bad pair fails at start, not at
    the first handshake (gRPC reports that only to the client, as UNAVAILABLE)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from prompting for an encrypted key.
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise ValueError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its "
            f"unencrypted private key ({e.reason or e})"
        ) from None


def _check_ca_bundle(path: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as e:
        raise ValueError(f"--tls-client-ca {path}: not a PEM CA bundle ({e})") from None
