"""Prometheus config and alert rules, checked by promtool (and unit-tested with promtool)."""

from pathlib import Path

from deploy_helpers import PROMETHEUS, ROOT, alert_rules, run

HERE = Path(__file__).parent


def test_promtool_check_config(promtool):
    out = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert "SUCCESS" in out.stdout


def test_promtool_check_rules(promtool):
    out = run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert "SUCCESS" in out.stdout


def test_alert_rules_behave(promtool):
    """promtool's rule unit tests: each alert fires on a bad series and stays quiet otherwise."""
    run([promtool, "test", "rules", str(HERE / "alerts_test.yml")], cwd=ROOT)


def test_required_alerts_exist():
    names = {r["alert"] for r in alert_rules()}
    assert {
        "BacktraceQueueBacklog",
        "BacktraceNoLiveWorker",
        "BacktraceJobFailureRate",
        "BacktraceApiLatencyP99High",
    } <= names
    for r in alert_rules():
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]


def test_scrape_targets_match_service_ports():
    import yaml

    cfg = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["backtrace-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["backtrace-worker"]["dns_sd_configs"][0]["port"] == 9101
