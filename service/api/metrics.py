"""The API's Prometheus metrics, in a registry of its own: request counts and durations by
route template (``middleware``), connected SSE clients (``sse``), and, read from Redis at
scrape time so they are never stale, queue depth and live workers."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .. import store

HTTP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)


class ApiMetrics:
    """The metrics, and a collector for the two gauges read from Redis."""

    def __init__(self, r: redis.Redis, queue: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "backtrace_http_requests_total",
            "HTTP requests",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "backtrace_http_request_duration_seconds",
            "HTTP request time",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.sse_clients = Gauge(
            "backtrace_sse_clients", "Connected SSE clients", registry=self.registry
        )
        self.r, self.queue = r, queue
        self.registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:  # called by prometheus_client at scrape
        depth = GaugeMetricFamily(
            "backtrace_queue_depth", "Jobs waiting in the queue", labels=["queue"]
        )
        live = GaugeMetricFamily("backtrace_workers_live", "Workers with a live heartbeat")
        try:
            depth.add_metric([self.queue], self.r.llen(f"rq:queue:{self.queue}"))
            live.add_metric([], len(store.live_workers(self.r)))
        except redis.RedisError:
            pass  # Redis down: export nothing rather than fail the scrape
        yield depth
        yield live

    def describe(self) -> list:
        return []
