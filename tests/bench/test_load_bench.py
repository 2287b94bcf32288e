"""bench/load.py end to end, small: its main() starts `bankd serve` twice on a tiny bank.

Under the server's concurrency limit (4 clients, limit 8) there is no error at all; over
it (8 clients, limit 2) there are RESOURCE_EXHAUSTED refusals and no other code, the
clients keep getting answers, and a fresh client is answered after the load. Nothing
here checks a duration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # two `bankd serve` children: seconds each


def test_load_under_and_over_the_concurrency_limit(
    tmp_path: Path, capsys: Any, load_bench: Callable[[str], Any]
) -> None:
    load = load_bench("load")
    common = ["--seconds", "2", "--warmup", "0.3", "--n", "2000", "--d", "32"]
    common += ["--workdir", str(tmp_path / "work"), "--sample-s", "0.5"]
    under, over = tmp_path / "under.json", tmp_path / "over.json"
    assert (
        load.main(["--clients", "4", "--max-concurrent", "8", "--json", str(under), *common]) == 0
    )
    assert load.main(["--clients", "8", "--max-concurrent", "2", "--json", str(over), *common]) == 0
    text = capsys.readouterr().out

    for path, clients, limit in ((under, 4, 8), (over, 8, 2)):
        doc = json.loads(path.read_text())
        (phase,) = doc["phases"]
        assert (phase["clients"], phase["limit"]) == (clients, limit)
        for field in ("requests", "answered", "answers_per_s", "queries_per_s", "errors"):
            assert field in phase
        for kind in ("search", "stream_message", "stream_call", "refusal"):
            assert set(phase["latency"][kind]) == {"n", "p50_ms", "p99_ms", "max_ms"}
        memory = phase["memory"]
        for field in ("rss_start_mb", "rss_warm_mb", "rss_end_mb", "rss_slope_mb_per_min"):
            assert memory[field] is not None, field
        assert phase["answered"] > 0
        assert phase["latency"]["search"]["n"] > 0 and phase["latency"]["stream_message"]["n"] > 0
        assert phase["clients_not_joined"] == 0
        assert phase["answered_after"], "the server did not answer a fresh client afterwards"
        assert phase["server_exit_code"] == 0
        assert phase["ok"], phase["verdict"]

    under_phase = json.loads(under.read_text())["phases"][0]
    assert under_phase["errors"] == {}
    assert under_phase["latency"]["refusal"]["n"] == 0

    over_phase = json.loads(over.read_text())["phases"][0]
    assert over_phase["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert set(over_phase["errors"]) == {"RESOURCE_EXHAUSTED"}
    assert over_phase["latency"]["refusal"]["n"] == over_phase["errors"]["RESOURCE_EXHAUSTED"]
    assert over_phase["clients_answered"] >= 1

    for line in ("answers/s", "queries/s", "Search (unary)", "SearchStream message"):
        assert line in text
    assert "refusals (RESOURCE_EXHAUSTED)" in text and "server memory MB" in text
    assert text.count("verdict: PASS") == 2
