"""The gRPC channel a client opens to one bankd target, and the stub it calls through.

    conn = open_channel("localhost:50051", token="...", load_balancing="round_robin")
    stub = search_stub(conn.channel)     # Search answers read as views (``wire``)
    stub.GetInfo(request, metadata=conn.metadata)

Message limits on both directions, gRPC's own retry of UNAVAILABLE (service config),
keepalive, HTTP/2's largest frame, the load-balancing policy, and TLS (server and
mutual) with a bearer token: as call credentials under TLS, as per-call metadata in
plaintext (gRPC refuses call credentials on an insecure channel). ``BankClient``'s
docstring explains each option to users.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import wire
from .credentials import check_token, read_file, read_token_file
from .proto import bankd_pb2 as pb
from .proto import bankd_pb2_grpc as pb_grpc

SERVICE_NAME = "bankd.v1.MemoryBank"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# HTTP/2's largest frame (2^24 - 1 bytes; 16 KiB by default): a 3.9 MB answer crosses
# in a few frames instead of 240, 3.9 -> 3.3 ms between two processes on 2 cores.
HTTP2_MAX_FRAME_BYTES = (1 << 24) - 1
LB_POLICIES = (None, "pick_first", "round_robin")  # None: gRPC's default, pick_first


@dataclass(frozen=True)
class Connection:
    """An open channel, the metadata every call sends on it, and its receive limit."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]  # the token in plaintext; empty otherwise
    max_message_bytes: int


def retry_service_config(max_attempts: int) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff (client side)."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def pem(value: bytes | str | os.PathLike | None, name: str) -> bytes | None:
    """PEM bytes as given, or read from a path; ValueError naming the option."""
    if value is None or isinstance(value, bytes):
        return value
    return read_file(value, flag=name)


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | str | os.PathLike | None = None,
    client_certificate: bytes | str | os.PathLike | None = None,
    client_key: bytes | str | os.PathLike | None = None,
    server_name: str | None = None,
    token: str | None = None,
    token_file: str | os.PathLike | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry_attempts: int = 5,
    load_balancing: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> Connection:
    """A channel to ``target`` with these options (``BankClient``'s, which see);
    ValueError for options that contradict each other."""
    if not 1 <= retry_attempts <= 5:
        raise ValueError("retry_attempts must be between 1 and 5 (gRPC caps it at 5)")
    if load_balancing not in LB_POLICIES:
        raise ValueError(f"load_balancing must be one of {LB_POLICIES}, got {load_balancing!r}")
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is not None:
        token = read_token_file(token_file)
    elif token is not None:
        check_token(token)
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS takes client_certificate and client_key together")
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.enable_retries": int(retry_attempts > 1),
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.http2.max_frame_size": HTTP2_MAX_FRAME_BYTES,
    }
    if retry_attempts > 1:  # gRPC refuses a retry policy of fewer than 2 attempts
        opts["grpc.service_config"] = retry_service_config(retry_attempts)
    if load_balancing:
        opts["grpc.lb_policy_name"] = load_balancing
    secure = tls or root_certificates is not None or client_certificate is not None
    if server_name:
        if not secure:
            raise ValueError("server_name checks the server's certificate: it needs TLS")
        opts["grpc.ssl_target_name_override"] = server_name
    opts.update(dict(options))
    names = {"grpc.ssl_target_name_override", "grpc.default_authority"}
    if secure and target.startswith(("ipv4:", "ipv6:")) and "," in target:
        if not names & opts.keys():  # gRPC would check the certificate for "a:p,b:p"
            raise ValueError(
                f"{target} lists several addresses and no host name: give server_name, "
                "the name the replicas' certificate carries"
            )
    limit = int(opts["grpc.max_receive_message_length"])
    if not secure:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return Connection(
            grpc.insecure_channel(target, options=list(opts.items())), metadata, limit
        )
    creds = grpc.ssl_channel_credentials(
        root_certificates=pem(root_certificates, "root_certificates"),
        private_key=pem(client_key, "client_key"),
        certificate_chain=pem(client_certificate, "client_certificate"),
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return Connection(grpc.secure_channel(target, creds, options=list(opts.items())), (), limit)


def search_stub(channel: grpc.Channel) -> pb_grpc.MemoryBankStub:
    """The generated stub, with Search answers read as views over the received bytes
    (``wire``): Search gives Hits, SearchStream gives StreamAnswers."""
    stub = pb_grpc.MemoryBankStub(channel)
    stub.Search = channel.unary_unary(
        f"/{SERVICE_NAME}/Search",
        request_serializer=pb.SearchRequest.SerializeToString,
        response_deserializer=wire.read_search_response,
    )
    stub.SearchStream = channel.stream_stream(
        f"/{SERVICE_NAME}/SearchStream",
        request_serializer=pb.SearchRequest.SerializeToString,
        response_deserializer=wire.read_stream_response,
    )
    return stub
