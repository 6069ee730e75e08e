"""The API writes RQ's hash of a job from a template RQ built once (``enqueue.job_fields``),
not from a ``Job`` per request: the hash must hold the fields RQ's own ``create_job`` and
``to_dict`` give, in their order and with their values (the timestamps aside, and the job's
data and meta as JSON of the same values), and RQ must read the same job back from it, or
workers would run another job than the one asked for."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from service.api.enqueue import COMPRESS_ABOVE, JOB_FUNC, job_fields
from service.config import Settings

BODIES = [
    {"model": "digits-cnn", "inputs": {"image": "aGVsbG8="}, "task": "image-classification"},
    {"model": "tiny-gpt", "inputs": {"text": ["é ü", "\u2028"]}, "generation": {"seed": None}},
    {},
    {"model": "tiny-bert", "inputs": {"text": "a long text " * 2000}},  # compressed
    {"model": "tiny-bert", "inputs": {"token_ids": [2**70]}},  # past orjson's integers
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
    as_json = ("created_at", "enqueued_at", "data", "meta")
    assert {k: v for k, v in ours.items() if k not in as_json} == {
        k: v for k, v in theirs.items() if k not in as_json
    }
    assert json.loads(_data(ours["data"])) == json.loads(_data(theirs["data"]))
    assert json.loads(ours["meta"]) == json.loads(theirs["meta"])
    assert (len(_data(ours["data"])) > COMPRESS_ABOVE) == (_data(ours["data"]) != ours["data"])
    stamps = ("created_at", "enqueued_at")
    assert all(ours[k].endswith("Z") and len(ours[k]) == len(theirs[k]) for k in stamps)


def _data(raw: bytes) -> bytes:
    """RQ's ``data`` field as RQ reads it: decompressed when it is compressed."""
    try:
        return zlib.decompress(raw)
    except zlib.error:
        return raw


@pytest.mark.parametrize("body", BODIES)
def test_rq_reads_the_job_back(body: dict, redis_url: str) -> None:
    """RQ's own ``Job.fetch`` of the hash gives the function, the request and the meta."""
    r = redis.Redis.from_url(redis_url)
    queue = Queue("q", connection=r, serializer=JSONSerializer)
    fields = job_fields(queue, Settings(), body, "m", "image-classification")
    r.hset(Job.key_for("fields-test"), mapping=fields)
    job = Job.fetch("fields-test", connection=r, serializer=JSONSerializer)
    assert job.func_name == JOB_FUNC
    assert job.kwargs == {"request": body}
    assert job.meta == {"model": "m", "task": "image-classification"}
    assert job.enqueued_at == job.created_at


def test_fields_follow_settings() -> None:
    """A template per queue and settings: another queue or TTL is not served a stale one."""
    a = Queue("a", connection=redis.Redis(), serializer=JSONSerializer)
    b = Queue("b", connection=redis.Redis(), serializer=JSONSerializer)
    s = Settings()
    longer = dataclasses.replace(s, result_ttl=s.result_ttl + 1)
    assert job_fields(a, s, {}, "m", "t")["origin"] == "a"
    assert job_fields(b, s, {}, "m", "t")["origin"] == "b"
    assert job_fields(a, longer, {}, "m", "t")["result_ttl"] == s.result_ttl + 1
