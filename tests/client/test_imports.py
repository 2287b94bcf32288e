"""Import boundaries: the client stays light, `bankd` is cheap, models are server-free,
and `bankd serve` (also `info`, `query`) runs without torch or transformers.

Each check runs in a fresh interpreter so modules imported by other tests do not count.
"""

from __future__ import annotations

import glob
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
    assert "faiss" in _top_level(_modules_after("import bankd.search.index"))


def test_client_proto_package_does_not_shadow_bankd() -> None:
    loaded = _modules_after("import bankd_client.proto.bankd_pb2_grpc")
    assert "bankd_client.proto.bankd_pb2" in loaded
    assert "bankd" not in _top_level(loaded)


# A bank written from arrays has no key function, so Embed is off and nothing needs torch.
_SERVE = """
import tempfile, numpy as np
from bankd.cli import build_parser
from bankd.serve.server import BankServer, ServerConfig
from bankd.store.writer import write_bank
args = build_parser().parse_args(["serve", "--index", "x.faiss"])
folder = tempfile.mkdtemp()
rng = np.random.default_rng(0)
index = write_bank(folder + "/bank.faiss", rng.standard_normal((50, 8), dtype=np.float32),
                   rng.standard_normal((50, 32, 96)).astype(np.float16))
server = BankServer(ServerConfig(index=str(index), port=0, metrics_port=0, device="{device}"))
server.start()
server.stop(grace=0)
"""
# Without /dev/nvidia* "auto" must not import torch to look for CUDA either.
_DEVICES = ["cpu"] + ([] if glob.glob("/dev/nvidia[0-9]*") else ["auto"])


@pytest.mark.parametrize("device", _DEVICES)
def test_serving_does_not_import_torch(device: str) -> None:
    loaded = _top_level(_modules_after(_SERVE.format(device=device)))
    assert "grpc" in loaded and "faiss" in loaded  # it did serve
    assert not loaded & {"torch", "transformers"}, sorted(loaded & {"torch", "transformers"})


def test_building_imports_torch_only_when_it_builds() -> None:
    """The parser and the build's config are light; the builder itself is torch."""
    parsed = "from bankd.cli import build_parser\nbuild_parser().parse_args(['info'])"
    assert "torch" not in _top_level(_modules_after(parsed))
    assert "torch" in _top_level(_modules_after("import bankd.build.pipeline"))
