"""Settings from the environment, shared by the API and the workers (no torch here).

The variable names match deploy/ (REDIS_URL, BACKTRACE_QUEUE, BACKTRACE_JOB_TIMEOUT,
BACKTRACE_REGISTRY) so the same ConfigMap drives both processes.

A value that cannot work is refused when the settings are made, as ``SettingError``: one line
naming the variable, its value and what it takes, which the commands print before starting
(``service.cli``). Read as they came, ``BACKTRACE_MAX_BATCH=abc`` was a traceback from
``int()``, and a negative TTL or ``BACKTRACE_MEMORY_BUDGET=lots`` started a service that failed
its requests or jobs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from engine.params import parse_bytes


class SettingError(ValueError):
    """A setting that cannot work: its message names the variable, the value and what it
    takes."""


# Each setting's environment variable, for the messages.
ENV = {
    "redis_url": "REDIS_URL",
    "queue": "BACKTRACE_QUEUE",
    "registry_path": "BACKTRACE_REGISTRY",
    "data_dir": "BACKTRACE_DATA_DIR",
    "job_timeout": "BACKTRACE_JOB_TIMEOUT",
    "result_ttl": "BACKTRACE_RESULT_TTL",
    "failure_ttl": "BACKTRACE_FAILURE_TTL",
    "retries": "BACKTRACE_RETRIES",
    "heartbeat_ttl": "BACKTRACE_HEARTBEAT_TTL",
    "max_body_bytes": "BACKTRACE_MAX_BODY_BYTES",
    "max_queue": "BACKTRACE_MAX_QUEUE",
    "stream_maxlen": "BACKTRACE_STREAM_MAXLEN",
    "keepalive_s": "BACKTRACE_SSE_KEEPALIVE",
    "api_keys": "BACKTRACE_API_KEYS",
    "metrics_port": "WORKER_METRICS_PORT",
    "cache_bytes": "BACKTRACE_CACHE_BYTES",
    "max_batch": "BACKTRACE_MAX_BATCH",
    "torch_threads": "BACKTRACE_TORCH_THREADS",
    "memory_budget": "BACKTRACE_MEMORY_BUDGET",
    "warm_models": "BACKTRACE_WARM_MODELS",
}

# The least value of each number setting (``metrics_port`` also has a greatest, 65535).
LEAST = {
    "job_timeout": 1,
    "result_ttl": 1,
    "failure_ttl": 1,
    "retries": 0,
    "heartbeat_ttl": 1,
    "max_body_bytes": 1,
    "max_queue": 0,
    "stream_maxlen": 1,
    "metrics_port": 0,
    "cache_bytes": 0,
    "max_batch": 1,
    "torch_threads": 1,
}

REDIS_SCHEMES = ("redis", "rediss", "unix")


def _env(name: str) -> str | None:
    """The variable's value; unset and blank read as unset."""
    value = os.environ.get(name, "").strip()
    return value or None


def _number(name: str, default: float, kind: type = int) -> float:
    """``name`` as a ``kind`` (int or float), or ``default`` when unset."""
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingError(f"{name}={raw!r} is not {what}") from None


def _int(name: str, default: int) -> int:
    return int(_number(name, default))


def _names(name: str) -> tuple[str, ...]:
    """A comma-separated list, blank items dropped."""
    return tuple(item.strip() for item in (_env(name) or "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL") or "redis://127.0.0.1:6379/0")
    queue: str = field(default_factory=lambda: _env("BACKTRACE_QUEUE") or "default")
    registry_path: str | None = field(default_factory=lambda: _env("BACKTRACE_REGISTRY"))
    data_dir: str = field(default_factory=lambda: _env("BACKTRACE_DATA_DIR") or "var/models")
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
        default_factory=lambda: _number("BACKTRACE_SSE_KEEPALIVE", 15.0, float)
    )
    api_keys: tuple[str, ...] = field(default_factory=lambda: _names("BACKTRACE_API_KEYS"))
    metrics_port: int = field(default_factory=lambda: _int("WORKER_METRICS_PORT", 9101))
    cache_bytes: int = field(default_factory=lambda: _int("BACKTRACE_CACHE_BYTES", 4 << 30))
    # Queued classification jobs of one model and parameters that a worker runs as one engine
    # batch (service.batching); 1 turns batching off.
    max_batch: int = field(default_factory=lambda: _int("BACKTRACE_MAX_BATCH", 8))
    # Torch threads of each worker process (unset: torch's own choice); one is faster for
    # small models on shared CPUs.
    torch_threads: int | None = field(
        default_factory=lambda: (
            None if _env("BACKTRACE_TORCH_THREADS") is None else _int("BACKTRACE_TORCH_THREADS", 0)
        )
    )
    # Bound on a generation sweep's working memory (engine.memory): "auto" (half the free
    # memory of the worker's device, read per job), a size such as "2GB", or "none"; a job that
    # cannot fit fails before any work, saying what it needs.
    memory_budget: str = field(default_factory=lambda: _env("BACKTRACE_MEMORY_BUDGET") or "auto")
    warm_models: tuple[str, ...] = field(default_factory=lambda: _names("BACKTRACE_WARM_MODELS"))

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in LEAST:
                self._at_least(f.name, LEAST[f.name])
        if self.metrics_port > 65535:
            self._refuse("metrics_port", "a port: 1 to 65535, or 0 for none")
        if not self.keepalive_s > 0:
            self._refuse("keepalive_s", "seconds above 0")
        if urlsplit(self.redis_url).scheme not in REDIS_SCHEMES:
            self._refuse("redis_url", "a URL of redis://, rediss:// or unix://")
        if self.memory_budget.lower() not in ("auto", "none"):
            try:
                parse_bytes(self.memory_budget)
            except ValueError:
                self._refuse("memory_budget", 'auto, none, or a size such as "512MB" or "2GB"')

    def _at_least(self, name: str, least: int) -> None:
        value = getattr(self, name)
        if value is not None and value < least:
            self._refuse(name, f"a whole number of at least {least}")

    def _refuse(self, name: str, takes: str) -> None:
        value = getattr(self, name)
        if name == "redis_url":  # its password stays out of logs
            value = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", value)
        raise SettingError(f"{ENV[name]}={value!r}: must be {takes}")
