"""A real Prometheus server (Debian's ``prometheus``) scrapes the session's stack (the API and
a worker on loopback, every second) while a small load runs, and loads deploy/prometheus/
alerts.yml. Then every query of the Grafana dashboard and every alert expression is evaluated
through Prometheus' HTTP API and must return data: a query that names a metric nobody
exports, a label nobody sets or a histogram suffix that does not exist shows up here as an
empty result, which promtool and the name checks of test_deploy_metric_names cannot see.
GPU panels are excepted on a worker without CUDA, which exports no GPU series."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from deploy_helpers import GPU_ONLY, PROMETHEUS, alert_rules, base_name, dashboard_exprs
from deploy_helpers import expr_metric_names as metric_names

from service.client import Client
from service.redis_server import free_port
from tests.helpers.inputs import digit_b64

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"
# Grafana's $__rate_interval is at least four scrape intervals; five minutes hold every scrape
# of the test, so each rate() sees the whole load. Every other variable is "All" (allValue .*).
RATE_INTERVAL = "5m"
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)")
# The operators that join an alert's conditions, with an optional on(...) / ignoring(...).
_JOIN = re.compile(r"[()]|\b(?:and|or|unless)\b(?:\s+(?:on|ignoring)\s*\([^)]*\))?")
_THRESHOLD = re.compile(r"\s*(?:[<>]=?|[!=]=)\s*(?:bool\s+)?[-+]?[\d.]+(?:[eE][-+]?\d+)?\s*$")


def substitute(expr: str) -> str:
    """The query Grafana would send with every variable on "All"."""
    return _VARIABLE.sub(
        lambda m: RATE_INTERVAL if (m[1] or m[2]) == "__rate_interval" else ".*", expr
    )


def conditions(expr: str) -> list[str]:
    """The series an alert compares: each operand of its top-level and/or/unless, without its
    comparison to a constant. Under a healthy load no alert fires, so the full expression is
    rightly empty; what must hold is that each compared series exists, or the alert could
    never fire (a silently dead alert). The full expression is still sent, so it must parse."""
    parts, depth, start = [], 0, 0
    for m in _JOIN.finditer(expr):
        if m[0] in "()":
            depth += 1 if m[0] == "(" else -1
        elif depth == 0:
            parts.append(expr[start : m.start()])
            start = m.end()
    parts.append(expr[start:])
    return [_THRESHOLD.sub("", p).strip() for p in parts]


def is_gpu(expr: str) -> bool:
    return any(base_name(n) in GPU_ONLY for n in metric_names(expr))


def load_jobs() -> list[tuple[dict, str]]:
    """(body, final status): digit jobs (cache hits), a generation job (per-token times) and
    a job of the model that always raises (failures)."""
    digit = {"model": "digits-cnn", "inputs": {"image": digit_b64(0)}}
    lm = {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1 f9 h0 ? c"},
        "generation": {"max_new_tokens": 2},
    }
    faulty = {"model": "faulty-metrics", "inputs": {"features": [1, 2, 3, 4]}}
    return [(digit, "finished"), (digit, "finished"), (lm, "finished"), (faulty, "failed")]


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory) -> Iterator[str]:
    """A Prometheus on a free loopback port scraping the stack every second, with the
    repository's alert rules; yields its URL once both targets have been scraped up."""
    if not Path(BINARY).exists():
        pytest.skip("no prometheus binary: `apt-get install -y prometheus` provides it")
    tmp = tmp_path_factory.mktemp("prometheus")
    targets = {"backtrace-api": stack.url, "backtrace-worker": stack.worker_metrics}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [urlsplit(url).netloc]}]}
            for job, url in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            BINARY,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_targets_up(url, proc, tmp / "prometheus.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_targets_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            active = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            if len(active) == 2 and all(t["health"] == "up" for t in active):
                return
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    pytest.fail(f"prometheus targets not up in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def loaded(stack, prometheus) -> str:
    """Runs the load twice while Prometheus scrapes; returns Prometheus' URL. The worker
    creates a labelled series at its first increment, so Prometheus' first sample of it is
    already 1, which rate() cannot tell from a constant: only the second round's jobs are
    increases it sees (reported: the worker should create its label sets at 0)."""
    client = Client(stack.url)
    for _ in range(2):
        for body, status in load_jobs():
            view = client.wait(client.submit(body)["job_id"], timeout=600)
            assert view["status"] == status, view
        time.sleep(3)  # a few scrapes
    return prometheus


def query(prometheus: str, expr: str, timeout: float = 15) -> list[dict]:
    """Instant query; retried while empty (the last scrapes may lag), failing on an error."""
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        if body["data"]["result"] or time.monotonic() > deadline:
            return body["data"]["result"]
        time.sleep(1)


def _cuda() -> bool:
    torch = pytest.importorskip("torch")
    return torch.cuda.is_available()


def _check(prometheus: str, expr: str) -> None:
    if is_gpu(expr) and not _cuda():
        assert not query(prometheus, expr, timeout=0), "GPU series from a worker without CUDA"
        return
    values = [float(r["value"][1]) for r in query(prometheus, expr)]
    assert values, f"no data for {expr}"
    # And a number: a ratio or quantile of rates that never moved is NaN, which Grafana draws
    # as nothing. Except model load times: a model loads once in a worker's life (the warm
    # ones before Prometheus starts here), and that first load is a series' first sample.
    if not metric_names(expr) & {"backtrace_model_load_seconds_sum"}:
        assert any(math.isfinite(v) for v in values), f"only NaN for {expr}: {values}"


PANEL_QUERIES = [e for e in dashboard_exprs() if not _LABEL_VALUES.search(e)]
VARIABLE_QUERIES = [e for e in dashboard_exprs() if _LABEL_VALUES.search(e)]


@pytest.mark.parametrize("expr", PANEL_QUERIES)
def test_dashboard_query_returns_data(loaded: str, expr: str) -> None:
    _check(loaded, substitute(expr))


@pytest.mark.parametrize("expr", VARIABLE_QUERIES)
def test_dashboard_variable_has_values(loaded: str, expr: str) -> None:
    """label_values(metric, label) is Grafana's, not PromQL: its API twin is the label's
    values on the metric's series."""
    metric, label = _LABEL_VALUES.search(expr).groups()
    resp = httpx.get(f"{loaded}/api/v1/label/{label}/values", params={"match[]": metric})
    assert resp.json()["data"], f"{expr}: no values"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_parses_and_its_series_exist(loaded: str, rule: dict) -> None:
    query(loaded, rule["expr"], timeout=0)  # parses and evaluates (empty when not firing)
    for series in conditions(rule["expr"]):
        _check(loaded, series)


def test_alert_rules_evaluate_without_errors(loaded: str) -> None:
    groups = httpx.get(f"{loaded}/api/v1/rules").json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    for name, r in rules.items():
        assert r["health"] == "ok", f"{name}: {r.get('lastError')}"


@pytest.mark.parametrize(
    "expr, parts",
    [
        ("sum(x) > 20", ["sum(x)"]),
        ("max(a) < 1\nand on() sum(b) > 0", ["max(a)", "sum(b)"]),
        ("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.1", ["sum(rate(a[5m])) / sum(rate(b[5m]))"]),
        (
            "histogram_quantile(0.99, sum by (le) (x)) > 1e2",
            ["histogram_quantile(0.99, sum by (le) (x))"],
        ),
    ],
)
def test_conditions(expr: str, parts: list[str]) -> None:
    assert conditions(expr) == parts


def test_substitute() -> None:
    got = substitute('rate(x{task=~"$task", m=~"${model}"}[$__rate_interval])')
    assert got == 'rate(x{task=~".*", m=~".*"}[5m])'
