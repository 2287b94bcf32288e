"""Checks of deploy/'s Prometheus and Grafana files: promtool (when installed) checks
the config and the rules and runs the alert unit tests; the metric names in the alert
rules and the dashboard are ones a bankd server exports; the dashboard's queries are
valid PromQL. Fast and offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_common import (
    GRAFANA,
    METRICS_PORT,
    PROMETHEUS,
    load,
)

from bankd.serve.metrics import Metrics

DASHBOARD = GRAFANA / "dashboards" / "bankd.json"
DASHBOARD_PANELS = (
    "Search latency (p50/p90/p99)",
    "Queries per second",
    "Errors by code",
    "Bank entries",
    "In-flight requests",
    "Process memory",
)
METRIC_NAME = re.compile(r"\b(?:bankd|process|python)_[a-z0-9_]+\b")


def exported_metric_names() -> set[str]:
    """Sample names a bankd server exports, labelled metrics included before first use."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ---- Prometheus -----------------------------------------------------------------


def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config() -> None:
    config = load(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for s in jobs["bankd"]["static_configs"] for t in s["targets"]]
    assert targets == [f"bankd:{METRICS_PORT}"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_metric_names()
    rules = [r for g in load(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"BankdSearchLatencyHigh", "BankdErrorRateHigh", "BankdTargetDown"} <= names
    assert "BankdNotReady" in names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
        assert not unknown, f"{rule['alert']} uses metrics bankd does not export: {unknown}"


# ---- Grafana --------------------------------------------------------------------


def _dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}


def test_dashboard_panels_query_exported_metrics() -> None:
    exported = exported_metric_names()
    panels = _dashboard_exprs()
    for title in DASHBOARD_PANELS:
        assert title in panels, f"dashboard has no panel {title!r}"
        used = {n for e in panels[title] for n in METRIC_NAME.findall(e)}
        assert used & exported, f"{title!r} queries no metric bankd exports"
    for title, exprs in panels.items():
        unknown = {n for e in exprs for n in METRIC_NAME.findall(e)} - exported
        assert not unknown, f"{title!r} uses metrics bankd does not export: {unknown}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, with Grafana's variables filled."""
    rules = []
    for title, exprs in _dashboard_exprs().items():
        for expr in exprs:
            expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            assert "$" not in expr, f"{title!r}: unexpected variable in {expr}"
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr})
    (tmp_path / "dashboard_rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    out = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
