"""deploy/: alerts and dashboard name only exported metrics; the systemd unit verifies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobworker.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "jobworker-dashboard.json"
UNIT = DEPLOY / "jobworker.service"

# A metric name in PromQL: jobworker_* or process_*, not a label value or part of a longer word.
METRIC = re.compile(r"(?<![A-Za-z0-9_:\"])((?:jobworker|process)_[a-z0-9_]+)")


def exported() -> set[str]:
    """Sample names the server's registry exposes (with _total, _bucket, _sum, _count)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def test_the_name_pattern_finds_suffixed_names_and_not_label_values() -> None:
    expr = 'rate(jobworker_rpc_duration_seconds_bucket{method!="process_x"}[5m]) + process_open_fds'
    assert metric_names([expr]) == {"jobworker_rpc_duration_seconds_bucket", "process_open_fds"}


def test_every_metric_in_the_alert_rules_is_exported() -> None:
    used = metric_names([rule["expr"] for rule in alert_rules()])
    assert used, "the rules name no jobworker metric"
    assert used - exported() == set()


def test_every_metric_in_the_dashboard_is_exported() -> None:
    used = metric_names(dashboard_exprs())
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= used
    assert used - exported() == set()


def test_the_alerts_the_issue_asks_for_exist_and_are_complete() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {
        "JobworkerDown",
        "JobworkerJobsFailing",
        "JobworkerQueueBackingUp",
        "JobworkerConfigReloadFailed",
    } <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
    assert "up{" in rules["JobworkerDown"]["expr"]
    assert "jobworker_jobs_queued" in rules["JobworkerQueueBackingUp"]["expr"]


def test_the_scrape_config_loads_the_rules_and_scrapes_the_default_port() -> None:
    data = yaml.safe_load(SCRAPE.read_text())
    assert data["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in data["scrape_configs"] if j["job_name"] == "jobworker"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert any(t.endswith(":9464") for t in targets)


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    d = dashboard()
    assert d["uid"] == "jobworker"
    assert isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in dashboard_panels()).lower()
    for topic in ("rpc", "latency", "running", "queued", "state", "output", "stream", "batches"):
        assert topic in titles, topic


def _unit_sections() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key] = value
    return sections


def test_the_unit_stops_gracefully_and_reloads_with_sighup() -> None:
    service = _unit_sections()["Service"]
    assert service["ExecStart"].endswith("serve --config /etc/jobworker/jobworker.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # SIGTERM to the server only: its jobs outlive a restart (jobs.on_server_stop = "keep")
    assert service["KillMode"] == "process"
    assert service["Delegate"] == "yes"
    assert service["Restart"] == "on-failure"
    # Longer than the default shutdown_grace (10s) plus kill_grace (5s).
    assert int(service["TimeoutStopSec"].removesuffix("s")) > 15
    assert "NoNewPrivileges" not in service  # jobs may use sudo and setuid binaries
    assert "ProtectSystem" not in service  # jobs may write anywhere


def test_the_unit_is_bounded_and_its_jobs_can_still_run() -> None:
    service = _unit_sections()["Service"]
    # Bounded (issue 11), yet room for max_concurrent (8) jobs at the default pids_max (4096).
    assert service["TasksMax"].isdigit()
    assert 8 * 4096 < int(service["TasksMax"]) <= 65536
    assert service["OOMPolicy"] == "continue"  # a job's OOM kill does not stop the service


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this checkout's jobworker.
    jobworker = Path(sys.executable).parent / "jobworker"
    if not jobworker.exists():
        pytest.skip(f"no jobworker executable beside {sys.executable}")
    unit = tmp_path / "jobworker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/jobworker", str(jobworker)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(unit) in line or "jobworker.service" in line
    ]
    assert result.returncode == 0, result.stderr
    assert problems == [], "\n".join(problems)
