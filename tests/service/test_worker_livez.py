"""The worker's ``/livez`` (Kubernetes' liveness probe, the compose healthcheck) follows its
own heartbeat, with a real worker process and a real redis-server: it fails within the
heartbeat TTL of Redis going away, and passes again once Redis is back. ``/metrics``, the
probe before, answered throughout, so nothing restarted a worker that could not beat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.redis_server import PrivateRedis, free_port
from tests.helpers.stack import ROOT

TTL = 3  # BACKTRACE_HEARTBEAT_TTL: beats every second, /livez fails after 3 s without one


def _wait_status(url: str, status: int, timeout: float) -> float:
    """Seconds until GET ``url`` answers ``status`` (TimeoutError after ``timeout``)."""
    started = time.monotonic()
    last = None
    while (took := time.monotonic() - started) < timeout:
        try:
            last = httpx.get(url, timeout=2).status_code
        except httpx.TransportError as exc:
            last = repr(exc)
        if last == status:
            return took
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s (last: {last})")


def test_livez_follows_the_heartbeat(tmp_path: Path) -> None:
    server = PrivateRedis()
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "BACKTRACE_HEARTBEAT_TTL": str(TTL),
        "BACKTRACE_TORCH_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("BACKTRACE_REGISTRY", None)
    cmd = [sys.executable, "-m", "service", "worker", "--no-warm", "--metrics-port", str(port)]
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    livez = f"http://127.0.0.1:{port}/livez"
    try:
        _wait_status(livez, 200, 120)
        assert "backtrace_jobs_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        server.stop()
        took = _wait_status(livez, 503, 3 * TTL)
        assert TTL - 1.5 < took < TTL + 3, took  # not before the bound, soon after it
        assert "no successful heartbeat" in httpx.get(livez).text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        assert worker.poll() is None, log.read_text()[-3000:]
        server = PrivateRedis(port=server.port)  # Redis back at the same address
        _wait_status(livez, 200, 10)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        server.stop()
