"""The worker's Prometheus metrics, exported by ``prometheus_client.start_http_server`` on
WORKER_METRICS_PORT (the API has its own set). Names are what dashboards and alerts use:
do not rename. No job id is ever a label."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from engine.tasks import TaskName

from .vocabulary import JobStatus

# Relevance jobs run for minutes on big models: buckets go to 600 s (the job timeout).
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

QUEUE_WAIT = Histogram(
    "backtrace_job_queue_wait_seconds",
    "Enqueue to start of a job",
    ["task", "model"],
    buckets=RUN_BUCKETS,
)
RUN = Histogram(
    "backtrace_job_run_seconds",
    "Start to end of a job in the worker",
    ["task", "model"],
    buckets=RUN_BUCKETS,
)
TOKEN = Histogram(
    "backtrace_token_seconds",
    "Time per generated token (with its relevance)",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
JOBS = Counter(
    "backtrace_jobs_total",
    "Jobs by final status (finished|failed|canceled)",
    ["task", "model", "status"],
)
CACHE_HITS = Counter("backtrace_model_cache_hits_total", "Model cache hits", ["model"])
CACHE_MISSES = Counter("backtrace_model_cache_misses_total", "Model cache misses", ["model"])
LOAD = Histogram(
    "backtrace_model_load_seconds",
    "Model load (and build) time on a cache miss",
    ["model"],
    buckets=RUN_BUCKETS,
)
TRACE_BYTES = Counter(
    "backtrace_trace_bytes_total", "Bytes of events and results written to Redis", ["model"]
)
GPU_ALLOCATED = Gauge(
    "backtrace_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", ["device"]
)
GPU_RESERVED = Gauge(
    "backtrace_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", ["device"]
)


def declare(models: Iterable[tuple[str, str]]) -> None:
    """Create every labelled series at zero for these (model id, task) pairs. A series that
    first appears at its first increment is invisible to ``rate()`` and ``increase()`` for
    that increment, and a ratio panel (cache hits over all lookups) drops a model that has
    only misses; declared at start, each one counts from zero."""
    for model, task in models:
        for status in (s for s in JobStatus if s.terminal):
            JOBS.labels(task=task, model=model, status=status)
        for histogram in (RUN, QUEUE_WAIT):
            histogram.labels(task=task, model=model)
        for series in (CACHE_HITS, CACHE_MISSES, LOAD, TRACE_BYTES):
            series.labels(model=model)
        if task == TaskName.GENERATION:
            TOKEN.labels(model=model)


def job_ended(
    task: str, model: str, status: str, queue_wait: float | None, run_s: float, written: int
) -> None:
    """Count a job's ending: its status, queue wait, run time and the bytes it wrote."""
    waited, ended, ran, wrote = _job_series(task, model, status)
    if queue_wait is not None:
        waited.observe(queue_wait)
    ended.inc()
    ran.observe(run_s)
    wrote.inc(written)


@functools.cache
def _job_series(task: str, model: str, status: str) -> tuple[Any, Any, Any, Any]:
    """A job's series for its labels, as ``labels`` gives them: looked up once per labels,
    where four ``labels`` calls per job (their checks, string conversions and locks) took
    about 10-30 us of a small job's worker CPU."""
    return (
        QUEUE_WAIT.labels(task=task, model=model),
        JOBS.labels(task=task, model=model, status=status),
        RUN.labels(task=task, model=model),
        TRACE_BYTES.labels(model=model),
    )


def update_gpu_memory() -> None:
    """Set the GPU gauges (only when CUDA exists, so CPU workers export no GPU series)."""
    import torch

    if not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        GPU_ALLOCATED.labels(device=f"cuda:{i}").set(torch.cuda.memory_allocated(i))
        GPU_RESERVED.labels(device=f"cuda:{i}").set(torch.cuda.memory_reserved(i))
