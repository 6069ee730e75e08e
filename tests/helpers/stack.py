"""The session's stack as tests see it: the repository root, the ``Stack`` record the
``stack`` fixture yields (tests/conftest.py), extra API processes for tests that need
other settings than the shared one, and whole private stacks for tests that need a registry
of their own (``private_stack``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.redis_server import PrivateRedis, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    url: str
    redis_url: str
    worker_metrics: str
    env: dict[str, str]
    tmp: Path


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """An API process (uvicorn) on a free loopback port, returned once /healthz answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("API did not start: " + log.read_text()[-3000:])


@dataclass
class PrivateStack:
    url: str
    worker: subprocess.Popen
    worker_log: Path


@contextmanager
def private_stack(tmp: Path, entries: list[dict[str, Any]], **env: str) -> Iterator[PrivateStack]:
    """A private redis-server, an API and one worker (one torch thread, no metrics port)
    serving a registry of ``entries``, with ``env`` on top of the test's environment;
    yielded as soon as the API answers (the worker may still be starting)."""
    (tmp / "registry.yaml").write_text(yaml.safe_dump({"models": entries}))
    drop = ("BACKTRACE_WARM_MODELS", "BACKTRACE_QUEUE")
    with PrivateRedis() as server:
        full = {k: v for k, v in os.environ.items() if k not in drop}
        full.update(
            REDIS_URL=server.url,
            BACKTRACE_REGISTRY=str(tmp / "registry.yaml"),
            BACKTRACE_DATA_DIR=str(tmp / "data"),
            BACKTRACE_SSE_KEEPALIVE="1",
            BACKTRACE_TORCH_THREADS="1",
            HF_HUB_OFFLINE="1",
            PYTHONPATH=str(ROOT),
            **env,
        )
        api, url = start_api(full, tmp / "api.log")
        log = tmp / "worker.log"
        with open(log, "w") as out:
            cmd = [sys.executable, "-m", "service", "worker", "--metrics-port", "0"]
            worker = subprocess.Popen(cmd, env=full, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield PrivateStack(url, worker, log)
        finally:
            for p in (worker, api):
                p.terminate()
            for p in (worker, api):
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
