"""Workers that die or are stopped in the middle of a job, as real processes: the job is
retried elsewhere or ends failed with the reason, within seconds, and every SSE client of
it sees the stream end."""

from __future__ import annotations

import asyncio
import base64
import signal
import threading
import time

import httpx
from rq.suspension import resume, suspend

from bench import load
from service import batching, store
from tests.helpers.cluster import HEARTBEAT_TTL, LONG_JOB, QUICK_JOB, Cluster, Listener, submit

# Noticing a dead worker takes its heartbeat TTL plus one reaper period (a third of it, and
# the reaper lock's half TTL); the retried job then runs again from the start.
NOTICE_S = 2 * HEARTBEAT_TTL
# What a claim writes with each job it takes (stream TTL, MAXLEN, retry limit).
START = batching.Start(3600, 10000, 1)


def victim_of(listener: Listener, cluster: Cluster) -> object:
    name = listener.wait_for("started")["worker"]
    return next(w for w in cluster.live if w.name == name)


def kill_mid_long_job(cluster: Cluster) -> tuple[str, Listener, object]:
    """Submit a long job and SIGKILL its worker three tokens in: (job id, its SSE, victim)."""
    job = submit(cluster.url, LONG_JOB)
    sse = Listener(cluster.url, job)
    victim = victim_of(sse, cluster)
    sse.wait_for("token", count=3)
    cluster.kill(victim)
    return job, sse, victim


def test_sigkill_mid_job_is_retried_on_another_worker(cluster: Cluster) -> None:
    cluster.workers(2)
    job, sse, victim = kill_mid_long_job(cluster)
    killed = time.monotonic()
    retrying = sse.wait_for("retrying", timeout=NOTICE_S + 5)
    assert time.monotonic() - killed < NOTICE_S + 5
    assert victim.name in retrying["reason"] and retrying["retries_left"] == 0
    names = sse.join(timeout=120)
    assert names[-1] == "done", names
    starts = [d for e, d, _ in sse.events if e == "started"]
    assert [s["attempt"] for s in starts] == [1, 2]
    assert starts[1]["worker"] != victim.name
    view = httpx.get(f"{cluster.url}/jobs/{job}").json()
    assert view["status"] == "finished" and len(view["result"]["generation"]["steps"]) == 64


def test_load_with_a_worker_killed_midway_loses_nothing(cluster: Cluster) -> None:
    """bench.load's clients (polling and SSE) while one of two workers is SIGKILLed: every
    job ends finished, none is lost, no client sees an error. The worker killed is the one
    running a long job submitted midway, so that the kill surely lands mid-job (the load's
    own jobs take milliseconds: a kill timed on them could fall between two)."""
    cluster.workers(2)
    report: dict = {}
    run = load.run(cluster.url, 8, 12, 5000, 120, 60)
    thread = threading.Thread(target=lambda: report.update(asyncio.run(run)))
    thread.start()
    time.sleep(3)
    _, sse, _ = kill_mid_long_job(cluster)
    thread.join(180)
    assert report["jobs"] >= 10 and report["finished"] == report["jobs"], report
    assert report["lost"] == 0 and report["errors"] == 0, report
    sse.wait_for("retrying", timeout=NOTICE_S + 5)
    assert sse.join(timeout=120)[-1] == "done"


def test_sigkill_with_no_retries_left_ends_failed_with_the_reason(cluster: Cluster) -> None:
    """One worker, killed, none left: the API's reaper ends the job and its stream."""
    url = cluster.api(BACKTRACE_RETRIES="0")
    (worker,) = cluster.workers(1)
    job = submit(url, LONG_JOB)
    sse = Listener(url, job)
    sse.wait_for("token")
    cluster.kill(worker)
    killed = time.monotonic()
    names = sse.join(timeout=NOTICE_S + 10)
    assert names[-1] == "error" and time.monotonic() - killed < NOTICE_S + 10
    view = httpx.get(f"{url}/jobs/{job}").json()
    assert view["status"] == "failed"
    assert view["error"]["type"] == "WorkerLost" and worker.name in view["error"]["message"]


def test_sigterm_lets_the_worker_finish_its_job_first(cluster: Cluster) -> None:
    (worker,) = cluster.workers(1)
    job = submit(cluster.url, LONG_JOB)
    behind = submit(cluster.url, QUICK_JOB)
    sse = Listener(cluster.url, job)
    sse.wait_for("token", count=3)
    worker.proc.send_signal(signal.SIGTERM)
    assert sse.join(timeout=120)[-1] == "done"
    assert worker.proc.wait(30) == 0
    assert [e for e in sse.names() if e == "started"] == ["started"]
    assert not cluster.r().exists(f"bt:worker:{worker.name}")
    # A warm shutdown takes no new job: the one behind is still waiting for a worker.
    assert httpx.get(f"{cluster.url}/jobs/{behind}").json()["status"] == "queued"


def test_worker_names_differ_for_the_same_host_and_pid() -> None:
    """A worker container restarted in place (same hostname, PID 1) must not inherit the
    dead worker's name: RQ would refuse to start it, and the reaper would think the dead
    worker's job still had a live worker."""
    assert store.worker_id() != store.worker_id()


def test_jobs_claimed_for_a_batch_by_a_dead_worker_go_back_to_the_queue(
    cluster: Cluster,
) -> None:
    """A worker that dies holding jobs it claimed for a batch (``service.batching``): the
    reaper puts them back at the front of the queue and a live worker runs them."""
    from service.demo.digits import sample_png

    cluster.workers(0)
    body = {"model": "digits-cnn", "inputs": {"image": base64.b64encode(sample_png(1)).decode()}}
    jobs = [submit(cluster.url, body) for _ in range(3)]
    r = cluster.r()
    (key,) = r.scan_iter("bt:batch:digits-cnn:*")
    group = key.decode().removeprefix("bt:batch:")
    claimed = batching.claim(r, group, "default", "ghost.1.dead", 10, 600, START)
    assert sorted(j.id for j in claimed) == sorted(jobs)
    assert not {i.decode() for i in r.lrange("rq:queue:default", 0, -1)} & set(jobs)
    assert {r.hget(f"rq:job:{j}", "status") for j in jobs} == {b"started"}
    cluster.workers(1)
    for job in jobs:
        sse = Listener(cluster.url, job)
        assert sse.join(timeout=NOTICE_S + 60)[-1] == "done"
        retrying = sse.wait_for("retrying")
        assert retrying["requeued"] and "ghost.1.dead" in retrying["reason"]
        assert httpx.get(f"{cluster.url}/jobs/{job}").json()["status"] == "finished"
    assert not r.hlen(batching.CLAIMS)


def test_claims_past_their_deadline_go_back_even_while_the_worker_lives(
    cluster: Cluster,
) -> None:
    """A batch that failed after claiming (a Redis error, say) leaves claims behind a live
    worker: past the claim's deadline the reaper puts those jobs back too."""
    from service.demo.digits import sample_png

    cluster.workers(0)
    r = cluster.r()
    suspend(r)  # the worker started now takes nothing, so the jobs stay queued for the claim
    try:
        (worker,) = cluster.workers(1)
        image = base64.b64encode(sample_png(2)).decode()
        body = {"model": "digits-cnn", "inputs": {"image": image}}
        jobs = [submit(cluster.url, body) for _ in range(2)]
        (key,) = r.scan_iter("bt:batch:digits-cnn:*")
        group = key.decode().removeprefix("bt:batch:")
        claimed = [j.id for j in batching.claim(r, group, "default", worker.name, 10, -1, START)]
        assert sorted(claimed) == sorted(jobs)
    finally:
        resume(r)
    for job in claimed:
        sse = Listener(cluster.url, job)
        assert sse.join(timeout=NOTICE_S + 60)[-1] == "done"
        assert sse.wait_for("retrying")["requeued"]
    assert not r.hlen(batching.CLAIMS)
