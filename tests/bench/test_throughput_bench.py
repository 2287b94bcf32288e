"""bench/throughput.py end to end, small: one `bankd serve` child on a tiny bank, a
reference phase, 1 and 4 concurrent clients, and the in-process search, a second each.
Nothing here checks a duration or the ratio's value, only that the figures are there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # a `bankd serve` child and four timed phases: seconds


def test_throughput_prints_every_phase_and_the_ratio(
    tmp_path: Path, capsys: Any, load_bench: Callable[[str], Any]
) -> None:
    throughput = load_bench("throughput")
    out = tmp_path / "throughput.json"
    argv = ["--n", "2000", "--d", "32", "--batch", "64", "--client-batch", "8"]
    argv += ["--clients", "1,4", "--seconds", "1", "--warmup-s", "0.2"]
    argv += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    assert throughput.main(argv) == 0

    text = capsys.readouterr().out
    assert re.search(r"^ratio\(4 x B=8 / 1 x B=64\) = \d+\.\d\d$", text.splitlines()[-1])
    doc = json.loads(out.read_text())
    names = [p["name"] for p in doc["phases"]]
    assert names == ["1 x B=64", "1 x B=8", "4 x B=8", "in-process faiss, B=64"]
    for phase in doc["phases"]:
        assert phase["rows"] > 0 and phase["queries_per_s"] > 0, phase
        assert phase["wrong_rows"] == 0 and not phase["errors"], phase
    for phase in doc["phases"][:3]:  # the server's merge statistics, per phase
        assert phase["server"]["index_searches"] > 0
        assert phase["server"]["rows_per_search"] >= phase["batch"]
    assert doc["ratio"] > 0
