"""The worker's HTTP port (WORKER_METRICS_PORT): ``/metrics`` for Prometheus and ``/livez``
for Kubernetes' liveness probe and the compose healthcheck.

``/metrics`` answered whenever the process lived, also with its heartbeat thread dead or
stuck, or unable to reach Redis for good: such a worker takes no jobs, and its key expires so
the reapers hand its job to others, yet nothing restarted it. ``/livez`` answers 503 once the
worker's last successful heartbeat is older than the heartbeat TTL (its key has expired by
then: the rest of the service already counts it as dead). A main thread that holds the GIL
stalls this server too, and the probe's timeout fails it. No torch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

LIVEZ = "/livez"


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def livez(silent_s: float, bound_s: float) -> tuple[str, bytes]:
    """The status line and body of ``/livez`` for a worker whose last successful heartbeat
    was ``silent_s`` seconds ago."""
    if silent_s > bound_s:
        why = f"no successful heartbeat for {silent_s:.1f} s (bound {bound_s:g} s)\n"
        return "503 Service Unavailable", why.encode()
    return "200 OK", f"ok: last heartbeat {silent_s:.1f} s ago\n".encode()


def app(silent_s: Callable[[], float], bound_s: float) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: ``/livez`` from ``silent_s()``, anything else Prometheus' exposition."""
    metrics = make_wsgi_app()

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != LIVEZ:
            return metrics(environ, start_response)
        status, body = livez(silent_s(), bound_s)
        start_response(status, [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [body]

    return serve


def start(port: int, silent_s: Callable[[], float], bound_s: float, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` and ``/livez`` on ``port`` from a daemon thread (as
    ``prometheus_client.start_http_server`` did for ``/metrics`` alone)."""
    httpd = make_server(addr, port, app(silent_s, bound_s), ThreadingWSGIServer, _Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
