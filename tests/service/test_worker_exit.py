"""A worker whose RQ loop quits on an error exits with a failure status, so that whatever
runs it (the supervisor, Kubernetes) restarts it with backoff. RQ logs the error
("found an unhandled exception, quitting") and returns as from a stop, and the worker then
exited 0: the supervisor restarted it at once, however often it failed the same way.

Two ways RQ's loop fails: a queued job whose hash RQ cannot read (a date that does not
parse: RQ quits its loop and says goodbye to Redis as from a stop), and Redis out of memory
from the moment a job is queued (one transaction: the worker's pop of the job is allowed, as
it frees memory; RQ's first write for it is refused, and so is its goodbye)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from service import store
from service.config import Settings
from service.redis_server import PrivateRedis
from service.vocabulary import WorkerExit
from service.worker import EARLY_STOP, _rq_worker
from tests.helpers.stack import ROOT


def _beating(r: redis.Redis, timeout: float, status: str = "ready") -> None:
    """Wait for a worker's heartbeat with this status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        beats = [json.loads(v) for k in r.keys(store.WORKER.format("*")) if (v := r.get(k))]
        if any(b.get("status") == status for b in beats):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no worker became {status}")


def _worker_exit(poison, warm: str = "") -> tuple[int, str]:
    """The exit status and output of a worker (warming the models named in ``warm``, by
    default none) once ``poison(r, queue, proc)`` has queued what fails its RQ loop (or
    stopped it)."""
    with PrivateRedis() as server:
        r = redis.Redis.from_url(server.url)
        env = {**os.environ, "REDIS_URL": server.url, "PYTHONPATH": str(ROOT)}
        env.pop("BACKTRACE_REGISTRY", None)
        env["BACKTRACE_WARM_MODELS"] = warm
        options = [] if warm else ["--no-warm"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "worker", *options, "--metrics-port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _beating(r, 120, "warming" if warm else "ready")
            poison(r, Queue("default", connection=r, serializer=JSONSerializer), proc)
            out, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return proc.returncode, out


def _unreadable_job(r: redis.Redis, queue: Queue, _: subprocess.Popen) -> None:
    r.hset("rq:job:bad", mapping={"created_at": "garbage", "status": "queued", "data": "x"})
    r.rpush(queue.key, "bad")


def _queued_into_a_full_redis(r: redis.Redis, queue: Queue, _: subprocess.Popen) -> None:
    job = queue.create_job("service.jobs.run_job", kwargs={"request": {}})
    pipe = r.pipeline(transaction=True)
    queue.enqueue_job(job, pipeline=pipe)
    pipe.config_set("maxmemory", 1)
    pipe.execute()


def test_a_worker_whose_rq_loop_quits_on_an_error_exits_with_a_failure_status() -> None:
    status, out = _worker_exit(_unreadable_job)
    assert "found an unhandled exception, quitting" in out, out[-3000:]
    assert status == WorkerExit.TEMPFAIL, out[-3000:]  # before: 0, restarted without backoff
    assert "exiting to be restarted" in out


def test_a_worker_whose_rq_goodbye_fails_exits_with_one_line_and_a_failure_status() -> None:
    status, out = _worker_exit(_queued_into_a_full_redis)
    assert status == WorkerExit.TEMPFAIL, out[-3000:]  # before: 1, with RQ's traceback
    assert "RQ's loop ended on a Redis error" in out
    assert "register_death" not in out, out  # the crash's traceback, through RQ's goodbye


def test_an_idle_worker_told_to_stop_exits_0() -> None:
    """A rolling update or a scale-down is no failure: RQ marks a stop only when a job runs,
    and an idle worker stopped by SIGTERM exited 75 with a false error line."""
    status, out = _worker_exit(_stop)
    assert status == 0, out[-3000:]
    assert "exiting to be restarted" not in out


def _stop(_r: redis.Redis, _queue: Queue, proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)


def test_a_worker_told_to_stop_while_it_warms_exits_0() -> None:
    """Before RQ's loop installs its signal handlers, SIGTERM had its default action: a
    worker stopped while warming (or between ``ready`` and RQ's bootstrap) died of it
    (-15), read as a crash. Stopped at its first (warming) beat, it leaves with 0."""
    status, out = _worker_exit(_stop, warm="digits-cnn")
    assert status == 0, out[-3000:]
    assert "stopped while warming (SIGTERM)" in out, out[-3000:]


def test_a_stop_that_came_before_rqs_loop_ends_it_at_its_first_turn(redis_url, monkeypatch) -> None:
    """SIGTERM between ``ready`` and RQ's loop (kept by ``EARLY_STOP``) is replayed when RQ
    installs its handlers. RQ's request_stop raises StopRequested when idle, which only its
    loop catches: raised before the loop, it escaped ``work()`` with a traceback and exit 1
    (seen in CI on a slow machine, where the race is wide)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = _rq_worker(Settings(redis_url=redis_url, queue="early-stop-test"), "early-stop")
    monkeypatch.setattr(EARLY_STOP, "signum", signal.SIGTERM)
    try:
        assert worker.work(burst=False) is False  # returns: no job taken, no StopRequested
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert worker.quit_cleanly(burst=False, max_jobs=None)  # exits 0, not 75
