"""What ``bankd serve`` takes, declared once: ServerConfig and ServiceLimits, each field
that is a flag carrying its ``Flag`` (name, help, unit) as field metadata.

From that one declaration come the argparse flags (``add_arguments``), the config of
parsed flags (``from_args``) and the command line that reproduces a config
(``command_line``, what ``bankd.serve.process.ServeProcess`` runs). Defaults are the
dataclasses'; a flag's default is shown in its own unit. Light to import (no grpc,
faiss or torch), so the ``bankd`` command builds its parser quickly.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from bankd.search.flat_kernel import FLAT_SEARCH

MIB = 1024 * 1024


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line.

    name: the flag ("--" + the field's name with dashes unless given); switch: a
    store_true flag that sets the field to ``not switch_off``; off: the flag value
    (any negative) that means None; multiply / divide: flag value -> field value
    (``--max-message-mb`` 256 -> 256 MiB; ``--merge-wait-us`` 500 -> 0.0005 s).
    """

    help: str
    name: str = ""
    type: Any = None
    choices: tuple[str, ...] | None = None
    required: bool = False
    switch: bool = False
    switch_off: bool = False  # --no-verify: the switch turns the field off
    off: bool = False
    multiply: int = 1
    divide: float = 1.0
    group: str = ""

    def to_config(self, value: Any) -> Any:
        if self.switch:
            return not value if self.switch_off else bool(value)
        if value is None or (self.off and value < 0):
            return None
        if self.multiply != 1:
            return value * self.multiply
        if self.divide != 1.0:
            return value / self.divide
        return value

    def to_flag(self, value: Any) -> Any:
        if self.switch:
            return not value if self.switch_off else bool(value)
        if value is None:
            return -1 if self.off else None
        if self.multiply != 1:
            return value // self.multiply
        if self.divide != 1.0:
            return value * self.divide
        return value


def flag(default: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field that is also a ``bankd serve`` flag (see ``Flag``)."""
    return field(default=default, metadata={"flag": Flag(**spec)})


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for."""

    max_batch: int = flag(8192, help="query rows per request")
    max_k: int = flag(1024, help="largest k a request may ask for")
    max_exclude_per_query: int = 1024
    max_fetch: int = 65_536
    max_embed: int = 256
    max_embed_pixels: int = flag(
        1 << 25,  # 33.5 Mpx: e.g. 128 images of 512 x 512
        help="pixels the images of one Embed request may declare together, read from their "
        "headers before anything is decoded; over it the request is INVALID_ARGUMENT. "
        "Decoded images take about 4 bytes a pixel, so this bounds what one Embed call holds",
    )
    merge_wait_s: float = flag(
        0.0005,
        name="--merge-wait-us",
        type=float,
        divide=1e6,
        help="how long to wait for concurrent requests to merge into one search",
    )
    merge_max_rows: int = 8192
    max_message_bytes: int = flag(
        256 * MIB, name="--max-message-mb", multiply=MIB, help="gRPC message size limit"
    )
    max_nprobe: int = flag(
        1024,
        help="largest nprobe a request may ask for (IVF; also capped at the index's nlist)",
    )  # per-request nprobe (IVF), also capped at the index's nlist
    max_ef_search: int = flag(1024, help="largest ef_search a request may ask for")

    def __post_init__(self) -> None:
        if self.max_embed_pixels < 1:
            raise ValueError(f"--max-embed-pixels must be >= 1, got {self.max_embed_pixels}")


SECURITY = "security (docs/operations.md, Security)"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `bankd serve` takes; logged at start."""

    index: str = flag(required=True, help="bank index file written by `bankd build`")
    host: str = flag("127.0.0.1", help="bind address (default loopback)")
    port: int = flag(50051, help="gRPC port (0 picks a free one)")
    metrics_port: int | None = flag(
        9100, type=int, off=True, help="Prometheus /metrics port; -1 disables"
    )
    metrics_host: str = flag("127.0.0.1", help="bind address of /metrics")
    device: str = flag("auto", help="search device: auto, cpu, cuda, cuda:N")
    flat_search: str = flag(
        "auto",
        choices=FLAT_SEARCH,
        help="exact search of a Flat index on the CPU: bankd's own kernel (x86-64 with AVX2 "
        "and FMA, k <= 64; about 1.25x FAISS's speed), FAISS, or auto (the kernel where it "
        "runs)",
    )
    threads: int | None = flag(
        None,
        type=int,
        help="CPU threads one search may use (FAISS's OpenMP threads and bankd's flat "
        "kernel's; default: one per core). Fewer leave cores to other work on the host, "
        "e.g. a trainer, or to concurrent Embed calls",
    )
    max_concurrent_rpcs: int = flag(64, help="RPCs answered at once; more get RESOURCE_EXHAUSTED")
    workers: int = 0  # gRPC handler threads; 0 = max_concurrent_rpcs + 8
    grace_s: float = flag(10.0, name="--grace", help="seconds to drain on SIGTERM")
    verify: bool = flag(
        True,
        name="--no-verify",
        switch=True,
        switch_off=True,
        help="skip checksums at load (sizes still checked)",
    )
    encoder: str | None = flag(
        None, type=str, help="encoder for Embed (default: the bank's own)"
    )  # load this encoder for Embed instead of the bank's
    no_embed: bool = flag(False, switch=True, help="do not load an encoder; Embed is off")
    mmap_index: bool = flag(
        False,
        switch=True,
        help="map the index's vectors (flat codes, IVF lists) from its file instead of reading "
        "them into memory: banks larger than RAM; the values are always mapped",
    )
    limits: ServiceLimits = ServiceLimits()
    tls_cert: str | None = flag(
        None, type=str, group=SECURITY, help="PEM certificate chain of the server: serve TLS"
    )
    tls_key: str | None = flag(
        None, type=str, group=SECURITY, help="PEM private key of --tls-cert (unencrypted)"
    )
    tls_client_ca: str | None = flag(
        None,
        type=str,
        group=SECURITY,
        help="PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    )
    auth_token_file: str | None = flag(
        None,
        type=str,
        group=SECURITY,
        help="file holding the bearer token every MemoryBank call must carry "
        "(health and reflection stay open)",
    )
    health_port: int | None = flag(
        None,
        type=int,
        help="also serve grpc.health.v1 alone, in plaintext, on this port of --host "
        "(for probes that cannot speak TLS; default off)",
    )
    shared_memory: bool = flag(
        True,
        name="--no-shared-memory",
        switch=True,
        switch_off=True,
        help="always send values in the response, even to a client on this host that "
        "offers a /dev/shm region for them",
    )
    ready_file: str | None = flag(
        None,
        type=str,
        help="once serving, write {port, metrics_port, health_port, pid, index} as JSON to "
        "this file (atomically): how a parent process learns the ports (ServeProcess)",
    )

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


def _flags(config_type: type) -> Iterator[tuple[str, Any, Flag]]:
    """(dotted field path, default, Flag) of every flag, ServiceLimits' inside ``limits``."""
    for f in fields(config_type):
        if f.name == "limits":
            for path, default, spec in _flags(ServiceLimits):
                yield f"limits.{path}", default, spec
        elif "flag" in f.metadata:
            yield f.name, f.default, f.metadata["flag"]


def _name(path: str, spec: Flag) -> str:
    return spec.name or "--" + path.rsplit(".", 1)[-1].replace("_", "-")


def _dest(path: str, spec: Flag) -> str:
    return _name(path, spec)[2:].replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``bankd serve``."""
    groups: dict[str, Any] = {}
    for path, default, spec in _flags(ServerConfig):
        target = parser
        if spec.group:
            target = groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        if spec.switch:
            target.add_argument(_name(path, spec), action="store_true", help=spec.help)
            continue
        kw: dict[str, Any] = {"help": spec.help}
        if spec.required:
            kw["required"] = True
        else:
            kw["default"] = spec.to_flag(default)
            kw["type"] = spec.type or type(default)
        if spec.choices:
            kw["choices"] = spec.choices
        target.add_argument(_name(path, spec), **kw)


def from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed ``bankd serve`` flags."""
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for path, _, spec in _flags(ServerConfig):
        value = spec.to_config(getattr(args, _dest(path, spec)))
        if path.startswith("limits."):
            limits[path.split(".", 1)[1]] = value
        else:
            top[path] = value
    return ServerConfig(**top, limits=replace(ServiceLimits(), **limits))


def command_line(config: ServerConfig) -> list[str]:
    """The ``bankd serve`` flags that give ``config``: --index and each flag whose value
    differs from its default. ValueError for a setting no flag reaches."""
    out: list[str] = []
    for f in fields(ServerConfig):
        if "flag" not in f.metadata and f.name != "limits":
            if getattr(config, f.name) != f.default:
                raise ValueError(f"ServerConfig.{f.name} has no bankd serve flag")
    for f in fields(ServiceLimits):
        if "flag" not in f.metadata and getattr(config.limits, f.name) != f.default:
            raise ValueError(f"ServiceLimits.{f.name} has no bankd serve flag")
    for path, default, spec in _flags(ServerConfig):
        obj: Any = config
        for part in path.split("."):
            obj = getattr(obj, part)
        if not spec.required and obj == default:
            continue
        flag_value = spec.to_flag(obj)
        if spec.switch:
            if flag_value:
                out.append(_name(path, spec))
            continue
        if isinstance(flag_value, float) and flag_value.is_integer():
            flag_value = int(flag_value)
        out += [_name(path, spec), str(flag_value)]
    return out
