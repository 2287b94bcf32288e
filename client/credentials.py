"""Client-side TLS, token and load-balancing options, and the command-line flags that
fill them.

    add_connection_flags(parser)                  # --tls-ca --tls-cert ... (bankd info/query)
    add_connection_flags(parser, prefix="bank-")  # --bank-tls-ca ...      (tinyalign --bank)
    BankClient(target, **connection_options(args))        # or connection_options(config,
                                                          #     prefix="bank_")

``connection_options`` reads attributes, so an argparse namespace and a config dataclass
with the same field names both work. ``read_token_file`` is also what `bankd serve`
uses for ``--auth-token-file``: one notion of a valid token file on both sides.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

TOKEN_FILE_ENV = "BANKD_TOKEN_FILE"

# option suffix -> BankClient keyword
_OPTIONS = {
    "tls": "tls",
    "tls_ca": "root_certificates",
    "tls_cert": "client_certificate",
    "tls_key": "client_key",
    "tls_server_name": "server_name",
    "auth_token_file": "token_file",
    "lb_policy": "load_balancing",
}


def read_token_file(path: str | os.PathLike, *, flag: str = "token_file") -> str:
    """The token in a file, surrounding whitespace dropped; ValueError naming the file."""
    raw = read_file(path, flag=flag)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: the token must be printable ASCII") from None
    if not token:
        raise ValueError(f"{flag} {path} is empty: put the bearer token in it")
    check_token(token, where=f"{flag} {path}")
    return token


def check_token(token: str, *, where: str = "token") -> None:
    """A token travels in a metadata value: one word of printable ASCII."""
    if not token or not all(" " < ch < "\x7f" for ch in token):
        raise ValueError(f"{where}: the token must be one word of printable ASCII")


def read_file(path: str | os.PathLike, *, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def add_connection_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """TLS, token and load-balancing flags of a command that connects to bankd
    (``--{prefix}tls-ca`` ...)."""
    g = parser.add_argument_group(f"{prefix.replace('-', ' ')}connection security")
    g.add_argument(
        f"--{prefix}tls",
        action="store_true",
        help="use TLS with the system's root CAs (implied by the other --tls flags)",
    )
    g.add_argument(f"--{prefix}tls-ca", help="PEM CA bundle that signed the server's certificate")
    g.add_argument(f"--{prefix}tls-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument(f"--{prefix}tls-key", help="PEM private key of the client certificate")
    g.add_argument(
        f"--{prefix}tls-server-name",
        help="name to check the server's certificate against, when not the target's host",
    )
    g.add_argument(
        f"--{prefix}auth-token-file",
        default=os.environ.get(TOKEN_FILE_ENV) or None,
        help=f"file holding the bearer token (default: ${TOKEN_FILE_ENV})",
    )
    parser.add_argument(
        f"--{prefix}lb-policy",
        choices=["pick_first", "round_robin"],
        help="gRPC load balancing over the addresses the target resolves to: round_robin "
        "spreads calls over replicas (a headless Service's dns:/// name); default pick_first",
    )


def connection_options(source: Any, prefix: str = "") -> dict[str, Any]:
    """BankClient keywords from ``source``'s ``{prefix}tls_ca``, ..., ``{prefix}lb_policy``
    attributes (set ones)."""
    attr = prefix.replace("-", "_")
    out: dict[str, Any] = {}
    for suffix, keyword in _OPTIONS.items():
        value = getattr(source, attr + suffix, None)
        if value:
            out[keyword] = value
    if ("client_certificate" in out) != ("client_key" in out):
        flag = f"--{attr.replace('_', '-')}"
        raise ValueError(f"{flag}tls-cert and {flag}tls-key go together (mutual TLS)")
    return out
