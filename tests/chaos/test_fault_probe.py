"""Faults the other chaos tests do not inject, each found to lose or garble something on a
real cluster: a worker stopped past its heartbeat and resumed after its job was handed on
(it wrote its tokens and its ending into the job's new run), a model folder whose
``config.json`` or ``tokenizer.json`` is corrupt (every POST for it was a 500), and SIGTERM
to ``serve --all-in-one`` while jobs run and wait (their streams ended with no final
event, the queued jobs gone with the private Redis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from service.redis_server import free_port
from service.registry import DEMO_REGISTRY
from service.vocabulary import WorkerExit
from tests.chaos.conftest import run_cluster
from tests.helpers.cluster import HEARTBEAT_TTL, LONG_JOB, Cluster, Listener, submit
from tests.helpers.stack import ROOT
from tests.service.test_supervisor import children, cmdline, state, until

NOTICE_S = 2 * HEARTBEAT_TTL  # as tests/chaos/test_workers.py
# Folders of registry entries that cannot load, by entry id: what each file holds.
BROKEN = {
    "corrupt-config": {"config.json": '{"model_type": "gpt2", "n_posi'},
    "corrupt-tokenizer": {
        "config.json": json.dumps({"model_type": "gpt2", "vocab_size": 40, "n_positions": 32}),
        "tokenizer.json": "garbage{",
    },
}


@pytest.fixture(scope="module")
def probe_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("probe")
    models = [m for m in DEMO_REGISTRY if m["id"] == "gpt2-small-config"]
    for model_id, files in BROKEN.items():
        for name, text in files.items():
            (tmp / model_id).mkdir(exist_ok=True)
            (tmp / model_id / name).write_text(text)
        source = {"kind": "transformers", "path": str(tmp / model_id), "head": "causal-lm"}
        limits = {"max_tokens": 32, "max_new_tokens": 4}
        models.append({"id": model_id, "task": "generation", "source": source, "limits": limits})
    yield from run_cluster(tmp, models, BACKTRACE_WARM_MODELS="gpt2-small-config")


def test_a_worker_resumed_after_its_job_was_handed_on_writes_nothing_more(
    probe_cluster: Cluster,
) -> None:
    """SIGSTOP past the heartbeat TTL (a stopped process, a paused VM), SIGCONT once another
    worker runs the job again, with no supervisor to kill it (Kubernetes): the resumed worker
    leaves (``WorkerExit.LOST``) without writing to the job, whose stream after its second
    ``started`` holds the second run's 64 tokens in order and its ending. Before, both runs
    wrote tokens into the one stream, interleaved, and the first to end ended the job."""
    cluster = probe_cluster
    cluster.workers(2)
    job = submit(cluster.url, LONG_JOB)
    sse = Listener(cluster.url, job)
    name = sse.wait_for("started")["worker"]
    victim = next(w for w in cluster.live if w.name == name)
    sse.wait_for("token", count=3)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        sse.wait_for("retrying", timeout=NOTICE_S + 5)
        sse.wait_for("started", count=2, timeout=30)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert victim.proc.wait(30) == WorkerExit.LOST
    names = sse.join(timeout=120)
    assert names[-1] == "done", names
    second = [e for e, d, _ in sse.events].index("started", names.index("retrying"))
    rest = sse.events[second:]
    assert rest[0][1]["worker"] != victim.name
    steps = [d["step"] for e, d, _ in rest if e == "token"]
    assert steps == list(range(64)), steps
    assert "started" not in [e for e, _, _ in rest[1:]]


@pytest.mark.parametrize("model_id", sorted(BROKEN))
def test_a_corrupt_model_folder_fails_its_jobs_not_the_door(
    probe_cluster: Cluster, model_id: str
) -> None:
    """The door reads a transformers folder's config.json and tokenizer.json; a corrupt one
    raised there, a 500 for every POST. Now the job is taken and fails in the worker, saying
    which model could not load, and the stream ends with that error."""
    cluster = probe_cluster
    cluster.workers(1)
    resp = httpx.post(
        f"{cluster.url}/run_task", json={"model": model_id, "inputs": {"text": "ab"}}, timeout=30
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()["job_id"]
    names = Listener(cluster.url, job).join(timeout=60)
    assert names[-1] == "error", names
    view = httpx.get(f"{cluster.url}/jobs/{job}").json()
    assert view["status"] == "failed" and model_id in view["error"]["message"], view


@contextmanager
def all_in_one(tmp: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``serve --all-in-one`` (a private Redis, one worker warming gpt2-small-config),
    yielded with its URL once it is ready; killed afterwards if still running."""
    models = [m for m in DEMO_REGISTRY if m["id"] == "gpt2-small-config"]
    (tmp / "registry.yaml").write_text(yaml.safe_dump({"models": models}))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        BACKTRACE_REGISTRY=str(tmp / "registry.yaml"),
        BACKTRACE_DATA_DIR=os.environ.get("BACKTRACE_DATA_DIR", str(ROOT / "var" / "models")),
        BACKTRACE_WARM_MODELS="gpt2-small-config",
        BACKTRACE_TORCH_THREADS="1",
        BACKTRACE_SSE_KEEPALIVE="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "serve", "--all-in-one", "--port", str(port)]
    command += ["--metrics-port", "0", "--log-level", "warning"]
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            until(lambda: ready(url), 300, "the all-in-one stack", poll=0.5)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_to_all_in_one_ends_every_stream_with_a_final_event(tmp_path: Path) -> None:
    """``serve --all-in-one`` (private Redis, one worker) told to stop while a job runs and
    two wait: the running job finishes and its stream ends ``done``; the waiting ones, which
    its private Redis takes with it, end ``error`` (``ServiceStopped``), and nothing is left
    running. Before, the API drained its streams first with a note to reconnect, to a
    service that was going away: no stream got a final event."""
    with all_in_one(tmp_path) as (proc, url):
        kids = children(proc.pid)
        jobs = [submit(url, LONG_JOB) for _ in range(3)]
        running, *waiting = [Listener(url, job) for job in jobs]
        running.wait_for("token", count=3)
        proc.send_signal(signal.SIGTERM)
        assert running.join(timeout=40)[-1] == "done"
        for sse in waiting:
            assert sse.join(timeout=40)[-1] == "error", sse.names()
            assert sse.wait_for("error")["type"] == "ServiceStopped"
        assert proc.wait(40) == 0
        until(lambda: all(state(p) in (None, "Z") for p in kids), 20, "its children to end")


def test_all_in_one_starts_its_private_redis_again_when_it_dies(tmp_path: Path) -> None:
    """The private redis-server SIGKILLed (the OOM killer) mid-job: the open stream still
    ends with a final event, and within seconds the stack takes and runs jobs again. Before,
    nothing restarted it: every request was a 503 for good."""
    with all_in_one(tmp_path) as (proc, url):
        (server,) = [p for p in children(proc.pid) if "redis-server" in cmdline(p)[0]]
        sse = Listener(url, submit(url, LONG_JOB))
        sse.wait_for("token", count=3)
        os.kill(server, signal.SIGKILL)
        assert sse.join(timeout=60)[-1] in ("done", "error"), sse.names()

        def accepted() -> str | None:
            try:
                resp = httpx.post(f"{url}/run_task", json=LONG_JOB, timeout=10)
            except httpx.TransportError:
                return None
            return resp.json()["job_id"] if resp.status_code == 202 else None

        job = until(accepted, 20, "a 202 after the restart", poll=0.5)
        assert Listener(url, job).join(timeout=60)[-1] == "done"
