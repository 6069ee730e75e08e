"""Workers that live but do not work, under the supervisor of ``worker --processes``: one
stuck in native code past its job's timeout (RQ's timeout cannot stop it), one SIGSTOPped
mid-job. The job ends with its reason or runs again elsewhere, never stays ``started``; the
worker is killed and replaced (``service.liveness``); /readyz does not count a stuck one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import store
from service.reaper import STUCK
from service.vocabulary import WorkerExit
from tests.chaos.conftest import run_cluster
from tests.helpers.cluster import Cluster, Listener, submit
from tests.helpers.stack import ROOT

# Long enough for a fresh worker to load and capture the model within a job.
TIMEOUT_S, TTL = 20, 3
GRACE_S = 10  # service.reaper.overrun_grace(TTL)
MODEL = {
    "id": "stuck",
    "task": "tabular-classification",
    "source": {"kind": "python", "factory": "tests.chaos.stuck_model:build"},
    "labels": ["a", "b"],
}


def job(first: float) -> dict:
    return {"model": "stuck", "inputs": {"features": [first, 1.0, 2.0, 3.0]}}


@pytest.fixture(scope="module")
def stuck_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from run_cluster(
        tmp_path_factory.mktemp("stuck"),
        [MODEL],
        BACKTRACE_JOB_TIMEOUT=str(TIMEOUT_S),
        BACKTRACE_HEARTBEAT_TTL=str(TTL),
        BACKTRACE_WARM_MODELS="",
    )


@pytest.fixture()
def supervised(stuck_cluster: Cluster) -> Iterator[subprocess.Popen]:
    """``worker --processes 1``, returned once its worker takes jobs."""
    log = open(stuck_cluster.tmp / "supervisor.log", "a")  # noqa: SIM115
    cmd = [sys.executable, "-m", "service", "worker", "--processes", "1", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=stuck_cluster.env, cwd=ROOT, stdout=log, stderr=log)
    try:
        ready_worker(stuck_cluster, exclude=set())
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ready_worker(cluster: Cluster, exclude: set[int], timeout: float = 300) -> dict:
    """The heartbeat of a ready worker whose pid is not in ``exclude``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in store.live_workers(cluster.r()):
            if store.is_ready(info) and info["pid"] not in exclude:
                return info
        time.sleep(0.2)
    raise AssertionError("no new worker: " + (cluster.tmp / "supervisor.log").read_text()[-3000:])


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"worker {pid} still running"
        time.sleep(0.2)


def test_a_job_stuck_in_native_code_fails_and_its_worker_is_replaced(
    stuck_cluster: Cluster, supervised: subprocess.Popen
) -> None:
    url = stuck_cluster.url
    job_id = submit(url, job(1000.0))
    sse = Listener(url, job_id)
    worker = sse.wait_for("started", timeout=60)["worker"]
    started = time.monotonic()
    names = sse.join(timeout=TIMEOUT_S + GRACE_S + 30)
    assert names[-1] == "error" and names.count("started") == 1, names
    assert time.monotonic() - started < TIMEOUT_S + GRACE_S + 30
    view = httpx.get(f"{url}/jobs/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "JobTimeout", view
    assert f"timeout of {TIMEOUT_S} s" in view["error"]["message"]
    assert worker in view["error"]["message"]
    pid = int(worker.split(".")[-2])
    wait_gone(pid, timeout=30)
    ready_worker(stuck_cluster, exclude={pid})
    after = submit(url, job(1.0))
    assert Listener(url, after).join(timeout=120)[-1] == "done"
    assert httpx.get(f"{url}/readyz").json().get("stuck") is None


def test_a_stopped_worker_is_killed_and_its_job_runs_again(
    stuck_cluster: Cluster, supervised: subprocess.Popen
) -> None:
    url = stuck_cluster.url
    job_id = submit(url, job(50.0))  # sleeps in Python: time to stop the worker mid-job
    sse = Listener(url, job_id)
    worker = sse.wait_for("started", timeout=60)["worker"]
    pid = int(worker.split(".")[-2])
    os.kill(pid, signal.SIGSTOP)
    try:
        sse.wait_for("retrying", timeout=4 * TTL + 10)
        wait_gone(pid, timeout=4 * TTL + 10)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    names = sse.join(timeout=180)
    assert names[-1] == "done", names
    starts = [d for e, d, _ in sse.events if e == "started"]
    assert [s["attempt"] for s in starts] == [1, 2] and starts[1]["worker"] != worker


def test_readyz_does_not_count_a_stuck_worker(stuck_cluster: Cluster) -> None:
    """A heartbeat that beats on (its thread runs) from a worker marked stuck."""
    r = stuck_cluster.r()
    name = "elsewhere.1.abcdef"
    store.heartbeat(r, name, {"name": name, "pid": 1, "status": "ready", "models": []}, ttl=30)
    r.set(STUCK.format(name), "ran past its timeout", ex=30)
    try:
        resp = httpx.get(f"{stuck_cluster.url}/readyz")
        assert resp.status_code == 503
        expected = {"ready": False, "redis": True, "workers": 0, "warming": 0, "stuck": 1}
        assert resp.json() == expected
    finally:
        r.delete(store.WORKER.format(name), STUCK.format(name))


def test_a_stall_of_the_whole_machine_hands_no_job_on(
    stuck_cluster: Cluster, supervised: subprocess.Popen
) -> None:
    """API, supervisor and worker paused together for over two heartbeat TTLs (a stalled
    machine), the worker resuming last: its heartbeat expired meanwhile, but it is alive.
    Neither the API's reaper nor the supervisor's probe may take that for a death: the job
    runs once, on its worker, which is not killed."""
    url = stuck_cluster.url
    job_id = submit(url, job(50.0))  # sleeps in Python for SLOW_S
    sse = Listener(url, job_id)
    worker = sse.wait_for("started", timeout=60)["worker"]
    pid = int(worker.split(".")[-2])
    first = [stuck_cluster.apis[-1].pid, supervised.pid]
    for p in [*first, pid]:
        os.kill(p, signal.SIGSTOP)
    time.sleep(2 * TTL + 2)
    for p in first:
        os.kill(p, signal.SIGCONT)
    time.sleep(0.5)
    os.kill(pid, signal.SIGCONT)
    assert sse.join(timeout=120)[-1] == "done", sse.names()
    assert sse.names().count("started") == 1 and "retrying" not in sse.names()
    assert not gone(pid)


def test_an_unsupervised_stuck_worker_exits_to_be_restarted(stuck_cluster: Cluster) -> None:
    """Under Kubernetes there is no supervisor to kill a stuck worker: once the reaper has
    failed its job, the worker itself exits with ``WorkerExit.STUCK`` (its heartbeat thread still
    runs), and the container is restarted."""
    (worker,) = stuck_cluster.workers(1)
    sse = Listener(stuck_cluster.url, submit(stuck_cluster.url, job(1000.0)))
    assert sse.wait_for("started", timeout=60)["worker"] == worker.name
    assert worker.proc.wait(TIMEOUT_S + GRACE_S + 30) == WorkerExit.STUCK
    assert sse.join(timeout=10)[-1] == "error"
