"""The reaper (``service.reaper``) on a real Redis, with jobs left as a dead worker leaves
them: a started job without a result is retried, one whose result is already stored is ended
in RQ as it ended, never run twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from rq import Queue, Retry
from rq.executions import Execution
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service import reaper, store
from tests.helpers.databases import own_database

QUEUE = "reaper-test"


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    yield from own_database(redis_url, 7)


def _started_by_dead_worker(r: redis.Redis) -> str:
    queue = Queue(QUEUE, connection=r, serializer=JSONSerializer)
    job = queue.enqueue("service.jobs.run_job", request={}, retry=Retry(max=1))
    queue.remove(job)
    pipe = r.pipeline()
    Execution.create(job, 600, pipeline=pipe, worker_name="gone")
    job.set_status(JobStatus.STARTED, pipeline=pipe)
    pipe.hset(job.key, "worker_name", "gone")
    pipe.execute()
    return job.id


def test_a_started_job_of_a_dead_worker_is_retried(r: redis.Redis) -> None:
    job_id = _started_by_dead_worker(r)
    assert reaper.reap(r, QUEUE, 0, 60, 600) == [job_id]
    queue = Queue(QUEUE, connection=r, serializer=JSONSerializer)
    assert queue.job_ids == [job_id]
    events = [f[b"event"] for _, f in r.xrange(store.EVENTS.format(job_id))]
    assert events == [b"retrying"]


@pytest.mark.parametrize(
    "status,event,registry,ttl",
    [("finished", "done", FinishedJobRegistry, 60), ("failed", "error", FailedJobRegistry, 600)],
)
def test_a_job_whose_result_is_stored_is_ended_not_run_again(
    r: redis.Redis, status: str, event: str, registry: type, ttl: int
) -> None:
    job_id = _started_by_dead_worker(r)
    store.finish(r, job_id, store.Ending(event, {}, {"status": status}), 60)
    assert reaper.reap(r, QUEUE, 0, 60, 600) == []
    queue = Queue(QUEUE, connection=r, serializer=JSONSerializer)
    job = queue.fetch_job(job_id)
    assert job.get_status() == status and queue.job_ids == []
    assert StartedJobRegistry(QUEUE, connection=r).get_job_ids() == []
    assert job_id in registry(QUEUE, connection=r).get_job_ids()
    assert ttl - 5 < r.ttl(job.key) <= ttl  # kept as long as a worker would keep it
    assert not list(r.scan_iter("rq:execution*")), "an execution record was left behind"
    events = [f[b"event"] for _, f in r.xrange(store.EVENTS.format(job_id))]
    assert events == [event.encode()]
