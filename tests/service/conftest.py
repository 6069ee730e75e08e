"""One real stack per test session: a private redis-server, one worker process (RQ
SimpleWorker) and the API under uvicorn on loopback, with a test registry (three demo
models and a model that always raises).

Redis: a private ``redis-server`` on a free port (the binary must be on PATH); without one,
TEST_REDIS_URL names a server the tests may flush. Demo models are built once into
BACKTRACE_DATA_DIR (default var/models, kept between runs; the first run takes a few minutes
on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from service.redis_server import PrivateRedis, free_port
from service.registry import DEMO_REGISTRY

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    url: str
    redis_url: str
    worker_metrics: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server"):
        with PrivateRedis() as server:
            yield server.url
    elif os.environ.get("TEST_REDIS_URL"):
        redis.Redis.from_url(os.environ["TEST_REDIS_URL"]).flushdb()
        yield os.environ["TEST_REDIS_URL"]
    else:
        pytest.skip("needs redis-server on PATH or TEST_REDIS_URL")


def _registry(tmp: Path) -> Path:
    keep = {"minilm-sentiment", "digits-cnn", "tiny-lookup-lm", "gpt2-small-config"}
    models = [
        {**m, "warm": m["id"] != "gpt2-small-config"} for m in DEMO_REGISTRY if m["id"] in keep
    ]
    models.append(
        {
            "id": "faulty",
            "task": "tabular-classification",
            "description": "always raises (tests)",
            "source": {"kind": "python", "factory": "tests.service.faulty:build"},
            "labels": ["a", "b"],
        }
    )
    path = tmp / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("service")
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BACKTRACE_REGISTRY": str(_registry(tmp)),
        "BACKTRACE_DATA_DIR": os.environ.get("BACKTRACE_DATA_DIR", str(ROOT / "var" / "models")),
        "BACKTRACE_SSE_KEEPALIVE": "1",
        "BACKTRACE_MAX_BODY_BYTES": str(1 << 20),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    logs = open(tmp / "stack.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "service", "worker", "--metrics-port", str(metrics_port)],
        env=env,
        cwd=ROOT,
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # first run builds the demo models
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if worker.poll() is not None or api.poll() is not None or time.time() > deadline:
                logs.flush()
                pytest.fail("stack did not start:\n" + (tmp / "stack.log").read_text()[-5000:])
            time.sleep(0.3)
        yield Stack(url, redis_url, f"http://127.0.0.1:{metrics_port}/metrics", env)
    finally:
        for p in (api, worker):
            p.terminate()
        for p in (api, worker):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


@pytest.fixture()
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c
