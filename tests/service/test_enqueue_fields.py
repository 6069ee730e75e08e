"""The API writes RQ's hash of a job from a template RQ built once (``enqueue.job_fields``),
not from a ``Job`` per request: the hash must be the one RQ's own ``create_job`` and
``to_dict`` give, field for field (the timestamps aside), or workers would read another
job than the one asked for."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from service.api.enqueue import JOB_FUNC, job_fields
from service.config import Settings

BODIES = [
    {"model": "digits-cnn", "inputs": {"image": "aGVsbG8="}, "task": "image-classification"},
    {"model": "tiny-gpt", "inputs": {"text": ["é ü", "\u2028"]}, "generation": {"seed": None}},
    {},
]


def rq_fields(queue: Queue, s: Settings, body: dict, model: str, task: str) -> dict:
    """What ``Queue.enqueue_call`` stores for the job, as the API wrote it before."""
    job = queue.create_job(
        JOB_FUNC,
        kwargs={"request": body},
        job_id="x",
        timeout=s.job_timeout,
        result_ttl=s.result_ttl,
        failure_ttl=s.failure_ttl,
        ttl=s.result_ttl,
        retry=Retry(max=s.retries) if s.retries else None,
        description=f"{model} {task}",
        meta={"model": model, "task": task},
    )
    job.origin = queue.name
    job.enqueued_at = job.created_at
    return job.to_dict()


@pytest.mark.parametrize("retries", [0, 2])
@pytest.mark.parametrize("body", BODIES)
def test_fields_are_rqs(body: dict, retries: int) -> None:
    s = dataclasses.replace(Settings(), retries=retries, job_timeout=77, result_ttl=55)
    queue = Queue("q", connection=redis.Redis(), serializer=JSONSerializer)
    ours = job_fields(queue, s, body, "m", "image-classification")
    theirs = rq_fields(queue, s, body, "m", "image-classification")
    assert list(ours) == list(theirs)  # the same fields, in the same order
    stamps = ("created_at", "enqueued_at")
    assert {k: v for k, v in ours.items() if k not in stamps} == {
        k: v for k, v in theirs.items() if k not in stamps
    }
    assert zlib.decompress(ours["data"]) == zlib.decompress(theirs["data"])
    assert all(ours[k].endswith("Z") and len(ours[k]) == len(theirs[k]) for k in stamps)


def test_fields_follow_settings() -> None:
    """A template per queue and settings: another queue or TTL is not served a stale one."""
    a = Queue("a", connection=redis.Redis(), serializer=JSONSerializer)
    b = Queue("b", connection=redis.Redis(), serializer=JSONSerializer)
    s = Settings()
    longer = dataclasses.replace(s, result_ttl=s.result_ttl + 1)
    assert job_fields(a, s, {}, "m", "t")["origin"] == "a"
    assert job_fields(b, s, {}, "m", "t")["origin"] == "b"
    assert job_fields(a, longer, {}, "m", "t")["result_ttl"] == s.result_ttl + 1
