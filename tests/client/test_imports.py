"""Import boundaries: the client stays light, `bankd` is cheap, models are server-free.

Each check runs in a fresh interpreter so modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        ("import bankd_client", {"faiss", "transformers", "torch", "bankd"}),
        ("from bankd_client import BankClient, Hits, errors, tensors, types", {"faiss", "torch"}),
        ("import bankd", {"faiss", "grpc", "torch"}),
        ("import bankd.models", {"grpc", "faiss"}),
    ],
)
def test_import_does_not_pull_in(statement: str, forbidden: set[str]) -> None:
    loaded = _top_level(_modules_after(statement))
    assert not loaded & forbidden, f"`{statement}` imported {sorted(loaded & forbidden)}"


def test_the_check_sees_imports() -> None:
    """Guard against a check that can never fail: importing faiss is noticed."""
    assert "faiss" in _top_level(_modules_after("import bankd.index"))


def test_client_proto_package_does_not_shadow_bankd() -> None:
    loaded = _modules_after("import bankd_client.proto.bankd_pb2_grpc")
    assert "bankd_client.proto.bankd_pb2" in loaded
    assert "bankd" not in _top_level(loaded)
