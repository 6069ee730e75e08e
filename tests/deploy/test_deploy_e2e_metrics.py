"""End to end: one job of each working task through a real API and a real worker process (on a
private real redis-server), then both /metrics are scraped and every metric name that the
dashboard and the alert rules use must be exported. The two backtrace_gpu_memory_* gauges are
exported only by a worker that sees CUDA: on a CPU machine they may be absent (and must be)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import httpx
import pytest
from deploy_helpers import GPU_ONLY, ROOT, base_name, used_metric_names

pytest.importorskip("service.cli", reason="service/ (issue 4) not present")
pytest.importorskip("torch", reason="the worker needs torch (pip install -e '.[engine]')")
parser = pytest.importorskip("prometheus_client.parser")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

START_TIMEOUT = 600  # a first start builds the demo models


def _png_digit() -> str:
    from PIL import Image

    img = Image.new("L", (16, 16), 0)
    for y in range(3, 13):  # a "1"
        img.putpixel((8, y), 255)
        img.putpixel((7, y), 200)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# One job per task that has a demo model. The text job runs twice so that the worker's model
# cache records a hit as well as the first miss.
JOBS = [
    {"model": "minilm-sentiment", "inputs": {"text": "a warm, wonderful and moving film"}},
    {"model": "minilm-sentiment", "inputs": {"text": "dull and far too long"}},
    {"model": "digits-cnn", "inputs": {"image": None}},
    {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1 f9 h0 ? c"},
        "generation": {"max_new_tokens": 2},
    },
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from service.redis_server import PrivateRedis, free_port

    logs = tmp_path_factory.mktemp("e2e")
    redis_server = PrivateRedis()
    api_port, worker_port = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "HF_HUB_OFFLINE": "1",
        "WORKER_METRICS_PORT": str(worker_port),
        # No warm-up: the jobs' own first loads are the cache misses and the load times.
        "BACKTRACE_WARM_MODELS": "",
    }
    env.pop("BACKTRACE_REGISTRY", None)  # the built-in demo registry
    procs = {}
    for name, cmd in {
        "worker": ["worker", "--no-warm"],
        "api": ["serve", "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
    }.items():
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs[name] = (
            subprocess.Popen(
                [sys.executable, "-m", "service", *cmd],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )

    def tail(name: str) -> str:
        return (logs / f"{name}.log").read_text()[-4000:]

    api = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            for name, (p, _) in procs.items():
                if p.poll() is not None:
                    pytest.fail(f"{name} exited with {p.returncode}:\n{tail(name)}")
            try:
                if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"not ready in {START_TIMEOUT} s:\n{tail('api')}\n{tail('worker')}")
            time.sleep(0.5)
        yield {
            "api": api,
            "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics",
            "tail": tail,
        }
    finally:
        for p, _log in procs.values():
            if p.poll() is None:
                p.terminate()
        for p, log in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()
        redis_server.stop()


@pytest.fixture(scope="module")
def finished_jobs(stack):
    api = stack["api"]
    ids = []
    with httpx.Client(base_url=api, timeout=30) as c:
        for body in JOBS:
            if "image" in body["inputs"]:
                body = {**body, "inputs": {"image": _png_digit()}}
            resp = c.post("/run_task", json=body)
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["job_id"])
            # Sequential, so that the second text job finds the model in the cache.
            deadline = time.time() + 540  # a cold first job builds its demo model
            while True:
                view = c.get(f"/jobs/{ids[-1]}").json()
                if view["status"] in {"finished", "failed", "canceled"}:
                    break
                assert time.time() < deadline, f"job {body['model']} stuck: {view}"
                time.sleep(0.2)
            assert view["status"] == "finished", (
                f"{body['model']}: {view}\n{stack['tail']('worker')}"
            )
            assert view["task"] in {"text-classification", "image-classification", "generation"}
    time.sleep(0.5)  # the worker counts its metrics just after writing the result
    return ids


def scrape(url: str) -> dict[str, list]:
    """Sample name -> samples, from a Prometheus text exposition."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, list] = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_every_dashboard_and_alert_metric_is_exported(stack, finished_jobs):
    exported = {**scrape(f"{stack['api']}/metrics"), **scrape(stack["worker_metrics"])}
    used = used_metric_names()
    missing = used - set(exported)
    gpu_missing = {m for m in missing if base_name(m) in GPU_ONLY}
    if gpu_missing:
        import torch

        assert not torch.cuda.is_available(), f"CUDA is here but {gpu_missing} are not exported"
        missing -= gpu_missing  # allowed: a CPU worker exports no GPU series
    assert not missing, f"used by the dashboard or alerts but not exported: {sorted(missing)}"


def test_metrics_carry_no_job_ids_and_run_buckets_reach_600s(stack, finished_jobs):
    samples = {**scrape(f"{stack['api']}/metrics"), **scrape(stack["worker_metrics"])}
    for name, items in samples.items():
        for s in items:
            for value in s.labels.values():
                assert not any(j in value for j in finished_jobs), f"{name} has a job id: {s}"
    les = {s.labels["le"] for s in samples["backtrace_job_run_seconds_bucket"]}
    assert "600.0" in les
    statuses = {s.labels["status"] for s in samples["backtrace_jobs_total"]}
    assert "finished" in statuses
    models = {s.labels["model"] for s in samples["backtrace_model_cache_hits_total"]}
    assert "minilm-sentiment" in models
