"""Helpers for tests/deploy: paths, the metric names the service exports, PromQL name extraction."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "backtrace.json"

# The contract with the service (issue 5): name -> type. API on :8000, worker on :9101.
API_METRICS = {
    "backtrace_http_requests_total": "counter",
    "backtrace_http_request_duration_seconds": "histogram",
    "backtrace_queue_depth": "gauge",
    "backtrace_workers_live": "gauge",
    "backtrace_sse_clients": "gauge",
}
WORKER_METRICS = {
    "backtrace_job_queue_wait_seconds": "histogram",
    "backtrace_job_run_seconds": "histogram",
    "backtrace_token_seconds": "histogram",
    "backtrace_jobs_total": "counter",
    "backtrace_model_cache_hits_total": "counter",
    "backtrace_model_cache_misses_total": "counter",
    "backtrace_model_load_seconds": "histogram",
    "backtrace_trace_bytes_total": "counter",
    "backtrace_gpu_memory_allocated_bytes": "gauge",
    "backtrace_gpu_memory_reserved_bytes": "gauge",
}
METRICS = {**API_METRICS, **WORKER_METRICS}
# Exported only by workers that run on CUDA.
GPU_ONLY = {"backtrace_gpu_memory_allocated_bytes", "backtrace_gpu_memory_reserved_bytes"}


def series_names() -> set[str]:
    """Every series name a query may use: histograms only through _bucket, _sum and _count."""
    names = set()
    for name, kind in METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer, enough for our queries)."""
    s = _STRINGS.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery selectors
    s = _GROUPING.sub("", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "1", s)  # Grafana variables
    s = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?\b", "1", s)  # numbers, durations
    return {m for m in _IDENT.findall(s) if m.lower() not in _KEYWORDS}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    for var in dashboard()["templating"]["list"]:
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            exprs.append(q)
    return exprs


def expr_metric_names(expr: str) -> set[str]:
    m = _LABEL_VALUES.search(expr)
    if m:
        return {m.group(1)}
    return promql_metric_names(expr)


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def used_metric_names() -> set[str]:
    names = set()
    for e in dashboard_exprs():
        names |= expr_metric_names(e)
    for r in alert_rules():
        names |= promql_metric_names(r["expr"])
    return names


def base_name(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in METRICS:
            return series[: -len(suffix)]
    return series


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def tool(name: str) -> str | None:
    """An executable from PATH or from the running venv's bin folder."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure, the assertion message carries its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc
