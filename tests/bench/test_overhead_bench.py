"""bench/overhead.py end to end, tiny: demo data, a bank, both VLMs, generate calls, one
memory child per configuration and two short training blocks each. Nothing here checks a
duration or a ratio's value, only that every figure is there and positive."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # builds a bank and a tiny LM, trains four short runs


def test_overhead_prints_latency_memory_and_training_ratios(
    tmp_path: Path, capsys: Any, load_bench: Callable[[str], Any], monkeypatch: Any
) -> None:
    monkeypatch.setenv("TINYALIGN_CACHE", str(tmp_path / "cache"))
    overhead = load_bench("overhead")
    out = tmp_path / "overhead.json"
    argv = ["--n", "24", "--repeats", "2", "--warmup", "1", "--new-tokens", "3"]
    argv += ["--train-steps", "2", "--train-batch", "2", "--k", "2", "--device", "cpu"]
    argv += ["--perceiver-steps", "1", "--tiny-llm-steps", "3"]
    argv += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    assert overhead.main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    for label in ("generate latency", "peak memory", "training step time"):
        assert any(
            re.fullmatch(rf"ratio\(tinyalign/baseline {label}\) = \d+\.\d\d", x) for x in lines
        ), label
    doc = json.loads(out.read_text())
    for part in ("latency", "train_step"):
        for name in ("baseline", "tinyalign"):
            assert doc[part][name]["n"] >= 1 and doc[part][name]["median_s"] > 0
    assert doc["latency"]["tinyalign"]["n"] == 2
    for name in ("baseline", "tinyalign"):
        assert doc["memory"][name]["peak_bytes"] > 0
        assert doc["memory"][name]["kind"] == "peak RSS"
    assert all(v > 0 for v in doc["ratios"].values())
