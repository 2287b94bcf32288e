"""bench/search_latency.py end to end, small: a tiny bank served by a `bankd serve`
child with and without --mmap-index. Nothing here checks a duration or a ratio's value,
only that the figures are there and bankd's answers equal the reference's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # a `bankd serve` child per run: seconds


@pytest.mark.parametrize("mmap_index", [False, True])
def test_search_latency_reports_latency_agreement_and_memory(
    tmp_path: Path, capsys: Any, load_bench: Callable[[str], Any], mmap_index: bool
) -> None:
    sl = load_bench("search_latency")
    out = tmp_path / "sl.json"
    argv = ["--n", "1500", "--d", "32", "--batch", "16", "--repeats", "3", "--warmup", "1"]
    argv += ["--clusters", "20", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    argv += ["--mmap-index"] if mmap_index else []
    assert sl.main(argv) == 0

    text = capsys.readouterr().out
    assert re.search(r"^ratio\(bankd/in-process\) = \d+\.\d\d$", text.splitlines()[-1])
    assert "0 rows differ" in text and "hits whose values differ: 0" in text
    assert "differ between the two transports: 0" in text
    assert "(3.9 MB" not in text and "MB, shared memory)" in text  # the child is on this host
    assert re.search(r"^ratio\(bankd values in the message/in-process\) = \d+\.\d\d$", text, re.M)
    assert ("(--mmap-index)" in text) == mmap_index
    doc = json.loads(out.read_text())
    assert doc["shared_memory"] is True
    memory = doc["memory"]
    assert memory["server"]["VmRSS"] > 0
    assert memory["index_mb"] > 0 and memory["values_mb"] > 0
    bank = memory["index_mb"] + memory["values_mb"]
    assert memory["limit_mb"] == pytest.approx(1.15 * bank + 300)
    assert memory["rss_over_limit"] == pytest.approx(memory["server"]["VmRSS"] / memory["limit_mb"])
    wire = doc["wire"]
    assert wire["response_bytes"] > 16 * 5 * 32 * 96 * 2
