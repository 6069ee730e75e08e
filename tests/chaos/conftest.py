"""A cluster per test module for the fault tests, apart from the session's shared stack:
its own redis-server (append-only, restartable), an API process, and the workers a test asks
for (``tests/helpers/cluster.py``). Heartbeats are short (BACKTRACE_HEARTBEAT_TTL=3) so that a
dead worker is noticed in seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.registry import DEMO_REGISTRY
from tests.helpers.cluster import HEARTBEAT_TTL, AofRedis, Cluster
from tests.helpers.stack import ROOT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    keep = {"tiny-lookup-lm", "gpt2-small-config", "digits-cnn"}
    models = [m for m in DEMO_REGISTRY if m["id"] in keep]
    tmp = tmp_path_factory.mktemp("chaos")
    yield from run_cluster(tmp, models, BACKTRACE_WARM_MODELS=",".join(sorted(keep)))


def run_cluster(tmp: Path, models: list[dict[str, Any]], **env: str) -> Iterator[Cluster]:
    """A cluster in ``tmp`` serving a registry of ``models``, with ``env`` on top of the
    fault tests' settings; its API is started, its workers are the test's to ask for."""
    (tmp / "redis").mkdir()
    server = AofRedis(tmp / "redis")
    registry = tmp / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": models}))
    full = {
        **os.environ,
        "REDIS_URL": server.url,
        "BACKTRACE_REGISTRY": str(registry),
        "BACKTRACE_DATA_DIR": os.environ.get("BACKTRACE_DATA_DIR", str(ROOT / "var" / "models")),
        "BACKTRACE_HEARTBEAT_TTL": str(HEARTBEAT_TTL),
        "BACKTRACE_SSE_KEEPALIVE": "1",
        "BACKTRACE_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    c = Cluster(server, full, tmp)
    try:
        c.url = c.api()
        yield c
    finally:
        try:
            for w in c.live:
                c.kill(w)
            for p in c.apis:
                p.terminate()
                p.wait(30)
        finally:
            server.stop()
