"""The committed gRPC stubs are exactly what proto/generate.py makes from the contract,
and the contract documents itself (a comment on every rpc, message, field and value)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "proto" / "generate.py"
PROTO = ROOT / "proto" / "bankd" / "v1" / "bankd.proto"
STUBS = ROOT / "client" / "proto"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bankd_proto_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate = _generator()
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.STUB_NAMES)
    stale = [p.name for p in written if p.read_bytes() != (STUBS / p.name).read_bytes()]
    assert not stale, (
        f"client/proto/{', '.join(stale)} differ from {PROTO.relative_to(ROOT)}; "
        "run `python proto/generate.py` and commit the result"
    )


def test_grpc_stub_imports_its_messages_relatively() -> None:
    text = (STUBS / "bankd_pb2_grpc.py").read_text()
    assert "from . import bankd_pb2" in text
    assert "from bankd.v1" not in text  # would import the server package `bankd`
    assert (STUBS / "__init__.py").exists()


def test_stubs_describe_the_service() -> None:
    from bankd_client.proto import bankd_pb2

    service = bankd_pb2.DESCRIPTOR.services_by_name["MemoryBank"]
    assert service.full_name == "bankd.v1.MemoryBank"
    assert [m.name for m in service.methods] == [
        "GetInfo",
        "Search",
        "SearchStream",
        "Fetch",
        "Embed",
    ]


def _undocumented(lines: list[str]) -> list[str]:
    """Declarations (rpc, message, enum, field, enum value) with no comment right above."""
    decl = re.compile(
        r"^\s*(rpc\s+\w+|message\s+\w+|enum\s+\w+|oneof\s+\w+|"
        r"(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+|\w+\s*=\s*\d+)"
    )
    missing = []
    for i, line in enumerate(lines):
        if not decl.match(line) or line.strip().startswith(("syntax", "package", "option")):
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("//"):
            missing.append(f"line {i + 1}: {line.strip()}")
    return missing


def test_contract_comments_every_declaration() -> None:
    assert _undocumented(PROTO.read_text().splitlines()) == []


def test_comment_check_catches_a_bare_field() -> None:
    with pytest.raises(AssertionError):
        assert _undocumented(["message A {", "  // ok", "  int32 a = 1;", "  int32 b = 2;"]) == []
