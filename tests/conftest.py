"""One real stack per test session, shared by tests/service and tests/web: a private
redis-server, one worker process (RQ SimpleWorker) and the API under uvicorn on loopback,
with a test registry (four demo models, a model that always raises, two from the other
source kinds and tiny BERTs for token classification and question answering). Fixtures
start nothing until a test asks for them.

Redis: a private ``redis-server`` on a free port (the binary must be on PATH); without one,
TEST_REDIS_URL names a server the tests may flush. Demo models are built once into
BACKTRACE_DATA_DIR (default var/models, kept between runs; the first run takes a few minutes
on 2 cores). What tests import (``Stack``, ``start_api``, the job helpers) is in
tests/helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from service.cli import api_command
from service.client import Client
from service.redis_server import PrivateRedis, free_port
from service.registry import DEMO_REGISTRY
from tests.helpers import models as tiny_berts
from tests.helpers.stack import ROOT, Stack


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
    # Two models that always raise: "faulty" for the service tests (which check it is not
    # warm until used), "faulty-metrics" for the Prometheus test's failed jobs, which runs
    # first on the same session stack.
    models += [
        {
            "id": model_id,
            "task": "tabular-classification",
            "description": "always raises (tests)",
            "source": {"kind": "python", "factory": "tests.service.faulty:build"},
            "labels": ["a", "b"],
        }
        for model_id in ("faulty", "faulty-metrics")
    ]
    # The other source kinds, from files made here: a transformers folder (the built
    # sentiment model) and a torchvision architecture with a safetensors weights file.
    data_dir = Path(os.environ.get("BACKTRACE_DATA_DIR", ROOT / "var" / "models"))
    models.append(
        {
            "id": "minilm-hf",
            "task": "text-classification",
            "source": {"kind": "transformers", "path": str(data_dir / "minilm-sentiment")},
            "limits": {"max_tokens": 64},
        }
    )
    models.append(
        {
            "id": "resnet18-random",
            "task": "image-classification",
            "source": {
                "kind": "torchvision",
                "arch": "resnet18",
                "weights": "resnet18.safetensors",
                "num_classes": 3,
            },
            "labels": ["cat", "dog", "bird"],
            "image": {
                "channels": 3,
                "size": 64,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "mode": "RGB",
            },
        }
    )
    _torchvision_weights(tmp / "resnet18.safetensors")
    # The tasks with several seeds per row, on tiny random BERTs (tests/helpers/models.py).
    bert = tiny_berts.build_folders(tmp / "tiny-bert")
    models += [
        tiny_berts.entry("tiny-bert-tokens", bert / "tiny-bert-tokens", "token-classification"),
        tiny_berts.entry("tiny-bert-qa", bert / "tiny-bert-qa", "question-answering"),
    ]
    path = tmp / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def _torchvision_weights(path: Path) -> None:
    """Seeded random resnet18 weights, written in a subprocess so that this test process
    stays torch-free like the API (it is not, but the weights file is all we need)."""
    code = (
        "import torch, torchvision, sys; from safetensors.torch import save_file; "
        "torch.manual_seed(0); m = torchvision.models.resnet18(weights=None, num_classes=3); "
        "save_file(m.state_dict(), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


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
        api_command(port),
        env=env,
        cwd=ROOT,
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:  # the first run builds the demo models
            Client(url).wait_ready(timeout=600, processes=(worker, api))
        except (RuntimeError, TimeoutError) as exc:
            logs.flush()
            pytest.fail(f"stack did not start ({exc}):\n" + (tmp / "stack.log").read_text()[-5000:])
        yield Stack(url, redis_url, f"http://127.0.0.1:{metrics_port}/metrics", env, tmp)
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
