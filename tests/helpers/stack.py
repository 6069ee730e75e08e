"""The session's stack as tests see it: the repository root, the ``Stack`` record the
``stack`` fixture yields (tests/conftest.py), and extra API processes for tests that need
other settings than the shared one."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.redis_server import free_port

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
