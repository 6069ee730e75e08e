"""Warm start, as ``scripts/serve.sh`` runs the service (``serve --all-in-one`` on the demo
registry, models built beforehand): the worker loads and captures every model the registry
marks warm (every demo model) before its heartbeat starts, so /readyz turns 200 only once they
are all warm, and the first job of each model pays no load and no capture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.client import Client
from service.demo import DEMO_IDS, ensure_built
from service.redis_server import free_port
from service.registry import load_registry
from tests.helpers.inputs import digit_b64
from tests.helpers.jobs import submit, wait
from tests.helpers.stack import ROOT

FIRST_JOBS = {
    "minilm-sentiment": {"text": "a fine film"},
    "digits-cnn": {"image": digit_b64(0)},
    "tiny-lookup-lm": {"text": "a3 c1 f9 h0 ? c"},
    "gpt2-small-config": {"text": "hello"},
}
# A capture costs seconds (torch.export); a cached one is a dictionary lookup.
NO_CAPTURE_S = 0.5


def test_every_demo_model_is_warm_before_ready(tmp_path: Path) -> None:
    data_dir = os.environ.get("BACKTRACE_DATA_DIR", str(ROOT / "var" / "models"))
    for model_id in DEMO_IDS:  # what serve.sh's build-demo does before the service starts
        ensure_built(model_id, data_dir)
    assert all(s.warm for s in load_registry(None).models.values())
    drop = ("REDIS_URL", "BACKTRACE_REGISTRY", "BACKTRACE_WARM_MODELS", "BACKTRACE_QUEUE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(BACKTRACE_DATA_DIR=data_dir, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--all-in-one", "--port", str(port)]
    cmd += ["--metrics-port", str(free_port())]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            Client(url).wait_ready(timeout=900, processes=(proc,))
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"not ready ({exc}):\n" + log.read_text()[-3000:])
        models = httpx.get(f"{url}/models", timeout=10).json()["models"]
        assert {m["id"] for m in models if m["warm"]} == set(DEMO_IDS)
        for model_id in DEMO_IDS:
            assert f"warm {model_id} in" in log.read_text()  # a progress line per model
        with httpx.Client(base_url=url, timeout=30) as client:
            for model_id, inputs in FIRST_JOBS.items():
                job = submit(client, {"model": model_id, "inputs": inputs})["job_id"]
                view = wait(client, job)
                assert view["status"] == "finished", view
                timings = view["timings"]
                assert timings["cache"] == "hit", (model_id, timings)
                assert timings["capture_s"] < NO_CAPTURE_S, (model_id, timings)
    finally:
        proc.terminate()  # serve stops its worker and its redis-server
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
