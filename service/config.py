"""Settings from the environment, shared by the API and the workers (no torch here).

The variable names match deploy/ (REDIS_URL, BACKTRACE_QUEUE, BACKTRACE_JOB_TIMEOUT,
BACKTRACE_REGISTRY) so the same ConfigMap drives both processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(
        default_factory=lambda: os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    )
    queue: str = field(default_factory=lambda: os.environ.get("BACKTRACE_QUEUE", "default"))
    registry_path: str | None = field(
        default_factory=lambda: os.environ.get("BACKTRACE_REGISTRY") or None
    )
    data_dir: str = field(
        default_factory=lambda: os.environ.get("BACKTRACE_DATA_DIR", "var/models")
    )
    job_timeout: int = field(default_factory=lambda: _int("BACKTRACE_JOB_TIMEOUT", 600))
    # Kept long enough to read a result after a slow client reconnects, short enough that
    # Redis (noeviction) does not fill up with traces.
    result_ttl: int = field(default_factory=lambda: _int("BACKTRACE_RESULT_TTL", 3600))
    failure_ttl: int = field(default_factory=lambda: _int("BACKTRACE_FAILURE_TTL", 86400))
    retries: int = field(default_factory=lambda: _int("BACKTRACE_RETRIES", 1))
    # A worker refreshes its heartbeat key every third of this; a started job whose worker's
    # key has expired is retried or failed (service.reaper) instead of waiting for RQ's
    # job_timeout + 60 s.
    heartbeat_ttl: int = field(default_factory=lambda: _int("BACKTRACE_HEARTBEAT_TTL", 15))
    max_body_bytes: int = field(default_factory=lambda: _int("BACKTRACE_MAX_BODY_BYTES", 8 << 20))
    max_queue: int = field(default_factory=lambda: _int("BACKTRACE_MAX_QUEUE", 1000))
    stream_maxlen: int = field(default_factory=lambda: _int("BACKTRACE_STREAM_MAXLEN", 10000))
    keepalive_s: float = field(
        default_factory=lambda: float(os.environ.get("BACKTRACE_SSE_KEEPALIVE", 15))
    )
    api_keys: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            k for k in os.environ.get("BACKTRACE_API_KEYS", "").split(",") if k.strip()
        )
    )
    metrics_port: int = field(default_factory=lambda: _int("WORKER_METRICS_PORT", 9101))
    cache_bytes: int = field(default_factory=lambda: _int("BACKTRACE_CACHE_BYTES", 4 << 30))
    # Queued classification jobs of one model and parameters that a worker runs as one engine
    # batch (service.batching); 1 turns batching off.
    max_batch: int = field(default_factory=lambda: _int("BACKTRACE_MAX_BATCH", 8))
    # Bound on a generation sweep's working memory (engine.memory): "auto" (half the free
    # memory of the worker's device, read per job), a size such as "2GB", or "none"; a job that
    # cannot fit fails before any work, saying what it needs.
    memory_budget: str = field(
        default_factory=lambda: os.environ.get("BACKTRACE_MEMORY_BUDGET", "auto")
    )
    warm_models: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            m for m in os.environ.get("BACKTRACE_WARM_MODELS", "").split(",") if m.strip()
        )
    )
