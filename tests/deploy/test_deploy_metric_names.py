"""The dashboard and the alert rules only use the metric names the service promises to export."""

import pytest
from deploy_helpers import (
    METRICS,
    alert_rules,
    base_name,
    dashboard,
    dashboard_exprs,
    promql_metric_names,
    series_names,
    used_metric_names,
)


@pytest.mark.parametrize(
    "expr, names",
    [
        (
            'sum by (route, status) (rate(backtrace_http_requests_total{route="/x"}[5m]))',
            {"backtrace_http_requests_total"},
        ),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ("max(x) < 1 and on() sum(y) > 0", {"x", "y"}),
        ("sum(rate(a_total[5m] offset 1h)) / clamp_min(b, 1e-9) > bool 2", {"a_total", "b"}),
        ('label_replace(up, "dst", "$1", "instance", "(.*)")', {"up"}),
    ],
)
def test_extractor(expr, names):
    assert promql_metric_names(expr) == names


def test_dashboard_and_alerts_use_only_exported_names():
    allowed = series_names()
    unknown = used_metric_names() - allowed
    assert not unknown, f"not exported by the service: {sorted(unknown)}"


def test_no_bare_histogram_names():
    hist = {n for n, kind in METRICS.items() if kind == "histogram"}
    assert not (used_metric_names() & hist)


def test_dashboard_covers_every_metric_family():
    used = {base_name(n) for e in dashboard_exprs() for n in promql_metric_names(e)}
    missing = set(METRICS) - used
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


def test_alerts_cover_the_issue():
    used = {base_name(n) for r in alert_rules() for n in promql_metric_names(r["expr"])}
    assert {
        "backtrace_queue_depth",
        "backtrace_workers_live",
        "backtrace_jobs_total",
        "backtrace_http_request_duration_seconds",
    } <= used


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"]
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["fieldConfig"]["defaults"]["unit"], p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("latency", "requests", "queue", "fail", "cache", "per-token", "gpu memory"):
        assert topic in titles, topic
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "model", "task"} <= variables
