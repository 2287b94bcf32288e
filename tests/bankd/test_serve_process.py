"""Tests of bankd.serve.flags (each serve flag declared once) and bankd.serve.process
(``bankd serve`` in a child process, ready through --ready-file)."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from bankd.cli import build_parser
from bankd.serve.flags import ServerConfig, ServiceLimits, command_line, from_args
from bankd.serve.process import ServeExited, ServeProcess, write_ready_file
from bankd_client import BankClient

TIMEOUT_S = 120.0


def parse(*argv: str) -> ServerConfig:
    return from_args(build_parser().parse_args(["serve", *argv]))


def test_the_flags_defaults_are_the_configs() -> None:
    assert parse("--index", "b.faiss") == ServerConfig(index="b.faiss")


def test_a_flag_changes_its_field_in_its_unit() -> None:
    config = parse(
        "--index", "b.faiss", "--metrics-port", "-1", "--max-message-mb", "64",
        "--merge-wait-us", "250", "--no-verify", "--no-shared-memory", "--mmap-index",
    )  # fmt: skip
    assert config.metrics_port is None and config.limits.max_message_bytes == 64 << 20
    assert config.limits.merge_wait_s == 0.00025
    assert not config.verify and not config.shared_memory and config.mmap_index


@pytest.mark.parametrize(
    "config",
    [
        ServerConfig(index="b.faiss"),
        ServerConfig(
            index="b.faiss",
            port=0,
            metrics_port=None,
            grace_s=2.5,
            verify=False,
            encoder="tiny",
            tls_cert="c.pem",
            health_port=0,
            limits=ServiceLimits(max_k=7, merge_wait_s=0.001, max_message_bytes=8 << 20),
        ),
    ],
)
def test_the_command_line_of_a_config_parses_back_to_it(config: ServerConfig) -> None:
    assert parse(*command_line(config)) == config


def test_every_field_that_is_not_a_flag_is_refused_on_a_command_line() -> None:
    with pytest.raises(ValueError, match="ServerConfig.workers has no bankd serve flag"):
        command_line(ServerConfig(index="b.faiss", workers=3))
    with pytest.raises(ValueError, match="ServiceLimits.max_fetch has no bankd serve flag"):
        command_line(ServerConfig(index="b.faiss", limits=ServiceLimits(max_fetch=9)))
    flagged = {f.name for f in fields(ServerConfig) if "flag" in f.metadata}
    assert {"index", "port", "tls_cert", "ready_file"} <= flagged


def test_the_ready_file_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    write_ready_file(path, port=5, pid=7)
    assert json.loads(path.read_text()) == {"port": 5, "pid": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]


def test_a_child_server_reports_its_ports_through_the_ready_file(bank: Any) -> None:
    config = ServerConfig(index=str(bank.path), port=0, metrics_port=0, device="cpu", no_embed=True)
    with ServeProcess(config, start_timeout=TIMEOUT_S) as server:
        assert server.port and server.metrics_port and server.pid == server.ready["pid"]
        assert server.ready["index"] == str(Path(bank.path).resolve())
        assert server.pid != os.getpid()
        with BankClient(server.address) as client:
            assert client.info().entries == len(bank.ids)
    assert server.proc.poll() is not None  # stopped on leaving the block


def test_wait_ready_notices_a_child_that_died(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bank.faiss"
    with pytest.raises(ServeExited) as e:
        ServeProcess(missing, start_timeout=TIMEOUT_S).start()
    assert e.value.code == 2
    assert "index file not found" in str(e.value) and str(missing) in str(e.value)
