"""What the worker logs when a job ends other than finished: a job canceled by request is
one line; any other failure keeps RQ's traceback."""

from __future__ import annotations

import logging

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from service.work.context import JobCanceled
from service.worker import Worker


def _raised(exc: Exception) -> tuple:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - the exc_info RQ hands to handle_exception
        return type(caught), caught, caught.__traceback__


@pytest.fixture()
def worker_and_job(redis_url: str) -> tuple[Worker, Job]:
    r = redis.Redis.from_url(redis_url)
    queue = Queue("log-test", connection=r, serializer=JSONSerializer)
    worker = Worker([queue], connection=r, serializer=JSONSerializer)
    job = Job.create("service.jobs.run_job", kwargs={"request": {}}, connection=r)
    return worker, job


def test_a_canceled_job_is_one_line(worker_and_job, caplog) -> None:
    worker, job = worker_and_job
    with caplog.at_level(logging.INFO, logger="rq.worker"):
        worker.handle_exception(job, *_raised(JobCanceled()))
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1 and "canceled by request" in lines[0] and "\n" not in lines[0]


def test_a_failure_keeps_its_traceback(worker_and_job, caplog) -> None:
    worker, job = worker_and_job
    with caplog.at_level(logging.INFO, logger="rq.worker"):
        worker.handle_exception(job, *_raised(ValueError("bad input")))
    assert any("Traceback" in rec.getMessage() for rec in caplog.records)
