"""A real Prometheus scrapes a real bankd and answers the dashboard's latency query.

Prometheus (the Debian package's binary; .ci/run installs it) runs on a free loopback
port with a temporary TSDB, scraping the server's /metrics every second with the alert
rules of deploy/prometheus loaded. While searches run, the HTTP API is polled until
the p99 of ``bankd_search_latency_seconds`` over the last minute is a number; the
rules must evaluate without error. Skipped where the binary is missing.
(tests/deploy/test_deploy_monitoring.py runs promtool over the config and the rules.)
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
P99 = "histogram_quantile(0.99, sum by (le) (rate(bankd_search_latency_seconds_bucket[1m])))"
TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow  # waits for scrapes: ~5-10 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def prometheus(tmp_path: Path, server_factory: Any, bank: Any) -> Iterator[tuple[int, Any]]:
    """(Prometheus's port, the bankd server it scrapes), Prometheus stopped at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    server = server_factory(bank.path)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "bankd",
                "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready"
                time.sleep(0.2)
        yield port, server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_scrapes_search_latency(prometheus: tuple[int, Any], bank: Any) -> None:
    from bankd_client import BankClient

    port, server = prometheus
    stop = threading.Event()

    def search() -> None:  # rate() needs the counters to move between scrapes
        with BankClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            q = bank.queries(8, seed=0)
            while not stop.is_set():
                client.search(q, k=5)
                stop.wait(0.05)

    searcher = threading.Thread(target=search, daemon=True)
    searcher.start()
    p99 = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while p99 is None and time.monotonic() < deadline:
            result = api(port, "query", query=P99)["result"]
            if result and math.isfinite(float(result[0]["value"][1])):
                p99 = float(result[0]["value"][1])
            else:
                time.sleep(0.5)
    finally:
        stop.set()
        searcher.join(15)
    assert p99 is not None, f"no p99 from Prometheus in {TIMEOUT_S:.0f} s: {P99}"
    assert 0 < p99 < 10, p99  # seconds: a loopback search of 8 keys on 3000 entries

    (up,) = api(port, "query", query='up{job="bankd"}')["result"]
    assert up["value"][1] == "1"
    codes = api(port, "query", query='bankd_requests_total{job="bankd",method="Search"}')
    assert {r["metric"]["code"] for r in codes["result"]} == {"OK"}

    # The alert rules load and evaluate against the real series without errors.
    while True:
        rules = [r for g in api(port, "rules")["groups"] for r in g["rules"]]
        if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules} >= {"BankdSearchLatencyHigh", "BankdErrorRateHigh"}
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, f"alerts fire on a healthy server: {firing}"
