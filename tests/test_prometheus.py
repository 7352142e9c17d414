"""deploy/prometheus and deploy/grafana: the alert rules pass promtool's check and unit tests,
and every metric they and the dashboard use is one balsync writes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from balance_sync.monitoring.metrics import RunMetrics, write_metrics
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "balsync.rules.yml"
RULE_TESTS = PROMETHEUS / "balsync.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "balsync.json"
# node_exporter's own metric for its textfile collector, used beside balsync's.
NODE_EXPORTER = {"node_textfile_scrape_error"}
METRIC = re.compile(r"\b(balsync_[a-z_]+|node_[a-z_]+)\b")
ALERTS = {
    "BalsyncNothingPersisted",
    "BalsyncMetricsMissing",
    "BalsyncRunFailed",
    "BalsyncPartialRunsRepeated",
    "BalsyncRunNearInterval",
    "BalsyncTextfileUnreadable",
    "BalsyncRedisRestartPending",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


def written_names(tmp_path: Path) -> set[str]:
    """The metric names of a textfile that balsync writes."""
    path = tmp_path / "balsync.prom"
    run = RunMetrics("user_balances", "success", 1000.0, 1.5, {"processed": 3}, True, True)
    assert write_metrics(path, run)
    return {family.name for family in text_string_to_metric_families(path.read_text())}


def rules() -> list[dict[str, Any]]:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    return list(group["rules"])


def test_rules_pass_promtool_check(promtool):
    """`promtool check rules` accepts the file: syntax, PromQL, templates."""
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests(promtool):
    """`promtool test rules`: each alert fires when it should, and not before."""
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_a_severity():
    """Each alert is named in the unit tests and carries severity, summary and description."""
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {rule["alert"] for rule in rules()} == ALERTS
    assert tested == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_rules_use_only_metrics_balsync_writes(tmp_path):
    """A typo in a metric name would make an alert silently never fire."""
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    assert used - NODE_EXPORTER <= written_names(tmp_path)
    assert "balsync_redis_restart_pending" in used


def test_dashboard_is_json_and_uses_only_metrics_balsync_writes(tmp_path):
    """Every panel's query names only balsync's metrics (and node_exporter's textfile error)."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = dashboard["templating"]["list"]
    expressions += [v["query"]["query"] for v in variables if v["type"] == "query"]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used - NODE_EXPORTER <= written_names(tmp_path)
    # Each metric balsync writes is shown somewhere.
    assert written_names(tmp_path) <= used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
