"""The worker's /metrics before any job: every labelled series of every registry model exists
at zero as soon as the metrics server answers, so that ``rate()`` sees the first job and a
ratio panel (cache hits over lookups) keeps a model that has only misses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.redis_server import free_port
from service.registry import load_registry
from service.vocabulary import JobStatus
from tests.helpers.stack import ROOT


def _scrape(url: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The worker's /metrics text, as soon as its server answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return httpx.get(url, timeout=2).text
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the worker's metrics server did not answer")


def test_every_series_exists_at_zero_before_any_job(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    # The demo registry, and a queue of its own: this worker takes none of the shared stack's
    # jobs, and warms nothing.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BACKTRACE_REGISTRY", "WORKER_METRICS_PORT")
    }
    env.update(
        REDIS_URL=redis_url,
        BACKTRACE_QUEUE=f"metrics-{uuid.uuid4().hex[:8]}",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "service", "worker", "--no-warm", "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        text = _scrape(f"http://127.0.0.1:{port}/metrics", proc)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    zeros = {
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.value == 0
    }
    for spec in load_registry(None).models.values():
        per_job = {"task": spec.task, "model": spec.id}
        for status in (s for s in JobStatus if s.terminal):
            labels = {**per_job, "status": status}
            assert ("backtrace_jobs_total", frozenset(labels.items())) in zeros
        for name in ("backtrace_job_run_seconds_count", "backtrace_job_queue_wait_seconds_count"):
            assert (name, frozenset(per_job.items())) in zeros
        per_model = frozenset({"model": spec.id}.items())
        for name in (
            "backtrace_model_cache_hits_total",
            "backtrace_model_cache_misses_total",
            "backtrace_trace_bytes_total",
            "backtrace_model_load_seconds_count",
        ):
            assert (name, per_model) in zeros
        token = ("backtrace_token_seconds_count", per_model) in zeros
        assert token == (spec.task == "generation")
