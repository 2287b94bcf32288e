"""bench/peers.py end to end at a tiny size: bankd, Milvus Lite and Chroma on one bank.

Skipped unless the peers are installed (`pip install -e ".[peers]"`). Exact search must
find every true neighbour (recall 1.0) on each flat index, every returned value must be
the entry's own, and the report ends with the two ratios. Nothing here checks a
duration.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # two `bankd serve` children and three peer processes

for module in ("milvus_lite", "chromadb"):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (the peers extra)", allow_module_level=True)


def test_peers_at_tiny_n(tmp_path: Path, capsys: Any, load_bench: Callable[[str], Any]) -> None:
    peers = load_bench("peers")
    out = tmp_path / "peers.json"
    argv = ["--n", "1500", "--d", "32", "--clusters", "16", "--batch", "32", "--k", "5"]
    argv += ["--repeats", "2", "--warmup", "1", "--workdir", str(tmp_path / "work")]
    assert peers.main([*argv, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out

    doc = json.loads(out.read_text())
    systems = doc["systems"]
    assert doc["skipped"] == {}
    assert set(systems) == {
        "faiss_flat", "faiss_hnsw", "bankd_flat", "bankd_hnsw",
        "bankd_flat_message", "bankd_hnsw_message",
        "milvus_flat", "milvus_hnsw", "chroma_hnsw",
    }  # fmt: skip
    for name in ("faiss_flat", "bankd_flat", "bankd_flat_message", "milvus_flat"):
        assert systems[name]["recall"] == 1.0, name
    for name, figures in systems.items():
        assert figures["median_ms"] > 0, name
        assert figures.get("value_mismatches", 0) == 0, name
        assert 0.0 <= figures["recall"] <= 1.0
    for name in ("milvus_flat", "milvus_hnsw", "chroma_hnsw"):
        assert systems[name]["load_s"] > 0
        assert systems[name]["memory"]["after_search"], name
    assert doc["bankd_ef_search"] in peers.EF_LADDER
    assert all(value > 0 for value in doc["ratios"].values())
    assert "ratio(milvus_flat/bankd_flat) = " in text
    assert "ratio(min(milvus_hnsw, chroma_hnsw)/bankd_hnsw_message) = " in text
    assert text.splitlines()[-1].startswith("ratio(min(milvus_hnsw, chroma_hnsw)/bankd_hnsw) = ")
    assert "shared memory was not used" not in captured.err
