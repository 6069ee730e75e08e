"""Faults the other chaos tests do not inject, each found to lose or garble something on a
real cluster: a worker stopped past its heartbeat and resumed after its job was handed on
(it wrote its tokens and its ending into the job's new run), and a model folder whose
``config.json`` or ``tokenizer.json`` is corrupt (every POST for it was a 500)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from service.registry import DEMO_REGISTRY
from service.vocabulary import WorkerExit
from tests.chaos.conftest import run_cluster
from tests.helpers.cluster import HEARTBEAT_TTL, LONG_JOB, Cluster, Listener, submit

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
