"""The worker's writes that replace round trips (``service.batching.claim`` and
``service.store.finish`` with ``if_canceled``), on a real Redis: a claim starts the jobs it
takes and reports their cancel flags, never revives an expired job, and a final write turns
into ``canceled`` when a cancel was asked while the job ran."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from service import batching, store
from service.vocabulary import Event, JobStatus
from tests.helpers.databases import own_database

QUEUE = "writes-test"
GROUP = "m:abc"
START = batching.Start(ttl=60, maxlen=100, retries=2)


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    yield from own_database(redis_url, 8)


def _queued(r: redis.Redis, n: int) -> list[str]:
    """``n`` jobs in RQ's queue and in the batch group's list, as the API enqueues them."""
    queue = Queue(QUEUE, connection=r, serializer=JSONSerializer)
    ids = []
    for i in range(n):
        job = queue.enqueue("service.jobs.run_job", request={"i": i}, retry=Retry(max=2))
        r.rpush(batching.BATCH.format(GROUP), job.id)
        ids.append(job.id)
    return ids


def test_a_claim_starts_its_jobs_and_reports_their_cancel_flags(r: redis.Redis) -> None:
    ids = _queued(r, 3)
    store.request_cancel(r, ids[1], 60)
    claimed = batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START)
    assert [(j.id, j.canceled) for j in claimed] == [
        (ids[0], False),
        (ids[1], True),
        (ids[2], False),
    ]
    assert [j.request["i"] for j in claimed] == [0, 1, 2]
    for job_id in ids:
        ((_, fields),) = r.xrange(store.EVENTS.format(job_id))
        assert fields[b"event"] == Event.STARTED.encode()
        assert json.loads(fields[b"data"]) == {"worker": "w.1.ab", "attempt": 1}
        assert 0 < r.ttl(store.EVENTS.format(job_id)) <= 60
        assert r.hget(f"rq:job:{job_id}", "status") == b"started"
    assert not r.lrange(f"rq:queue:{QUEUE}", 0, -1)


def test_a_claim_counts_the_attempt_from_the_retries_left(r: redis.Redis) -> None:
    (job_id,) = _queued(r, 1)
    r.hset(f"rq:job:{job_id}", "retries_left", 1)  # one retry spent: the second run
    batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START)
    ((_, fields),) = r.xrange(store.EVENTS.format(job_id))
    assert json.loads(fields[b"data"])["attempt"] == 2


def test_a_claim_never_revives_an_expired_job(r: redis.Redis) -> None:
    """An id still queued whose job hash expired leaves the queue unclaimed: no hash
    without expiry, no claim, no event."""
    gone, kept = _queued(r, 2)
    r.delete(f"rq:job:{gone}")
    claimed = batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START)
    assert [j.id for j in claimed] == [kept]
    assert not r.exists(f"rq:job:{gone}") and not r.exists(store.EVENTS.format(gone))
    assert r.hkeys(batching.CLAIMS) == [kept.encode()]
    assert not r.lrange(f"rq:queue:{QUEUE}", 0, -1)


def test_a_worker_behind_its_fence_claims_nothing(r: redis.Redis) -> None:
    """Once the reaper took a worker for dead (its fence is set, ``store.fence``), its
    claims take nothing: a worker stopped past its heartbeat and resumed would otherwise
    claim jobs before its first refused write sends it away, and they would wait for its
    heartbeat to expire. Another worker claims them."""
    ids = _queued(r, 2)
    r.set(store.fence("w.1.ab"), 1)
    assert batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START) == []
    assert r.lrange(f"rq:queue:{QUEUE}", 0, -1) == [i.encode() for i in ids]
    assert not r.exists(batching.CLAIMS)
    claimed = batching.claim(r, GROUP, QUEUE, "w.2.cd", 10, 600, START)
    assert [j.id for j in claimed] == ids


def test_a_claim_reads_the_enqueue_time_and_retries_as_rq_does(r: redis.Redis) -> None:
    """A claim reads three fields of RQ's hash instead of building RQ's ``Job``: what it
    reads is what ``Job.fetch`` would give."""
    (job_id,) = _queued(r, 1)
    r.hset(f"rq:job:{job_id}", "retries_left", 1)
    rq_job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    (claimed,) = batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START)
    assert claimed.request == rq_job.kwargs["request"]
    assert claimed.enqueued_at == rq_job.enqueued_at.timestamp()
    assert claimed.retries_left == rq_job.retries_left == 1


@pytest.mark.parametrize("status", [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED])
def test_settling_claimed_jobs_ends_them_in_rq_as_rq_ends_its_own(
    r: redis.Redis, status: JobStatus
) -> None:
    """``settle`` writes in one script what RQ's ``set_status``, registry ``add`` and
    ``cleanup`` write for a job it ran (the reference, ended here through RQ's objects), and
    removes the claims."""
    ours, theirs = _queued(r, 2)
    batching.claim(r, GROUP, QUEUE, "w.1.ab", 10, 600, START)
    pipe = r.pipeline(transaction=False)
    batching.settle(pipe, QUEUE, [(ours, status)], 60, 600)
    pipe.execute()
    job = Job.fetch(theirs, connection=r, serializer=JSONSerializer)
    ok, canceled = status == JobStatus.FINISHED, status == JobStatus.CANCELED
    rq_status = {JobStatus.FINISHED: RQStatus.FINISHED, JobStatus.CANCELED: RQStatus.CANCELED}
    pipe = r.pipeline(transaction=False)
    job.set_status(rq_status.get(status, RQStatus.FAILED), pipeline=pipe)
    registry = (FinishedJobRegistry if ok else FailedJobRegistry)(QUEUE, connection=r)
    if not canceled:
        registry.add(job, 60 if ok else 600, pipeline=pipe)
    job.cleanup(60 if ok else 600, pipeline=pipe, remove_from_queue=False)
    pipe.execute()
    assert r.hget(f"rq:job:{ours}", "status") == r.hget(f"rq:job:{theirs}", "status")
    assert r.hget(f"rq:job:{ours}", "ended_at")
    assert abs(r.ttl(f"rq:job:{ours}") - r.ttl(f"rq:job:{theirs}")) <= 1
    for key in (FinishedJobRegistry(QUEUE).key, FailedJobRegistry(QUEUE).key):
        ours_score, theirs_score = r.zscore(key, ours), r.zscore(key, theirs)
        assert (ours_score is None) == (theirs_score is None)
        assert ours_score is None or abs(ours_score - theirs_score) <= 1
    assert (r.zscore(registry.key, ours) is None) == canceled
    assert ours.encode() not in r.hkeys(batching.CLAIMS)


@pytest.mark.parametrize("cancel", [False, True])
def test_a_result_is_stored_as_canceled_when_a_cancel_came_meanwhile(
    r: redis.Redis, cancel: bool
) -> None:
    if cancel:
        store.request_cancel(r, "j1", 60)
    done = store.Ending(Event.DONE, {"status": "finished"}, {"status": "finished", "x": 1})
    canceled = store.Ending(Event.CANCELED, {"type": "JobCanceled"}, {"status": "canceled"})
    pipe = r.pipeline(transaction=False)
    store.finish(pipe, "j1", done, 60, 100, if_canceled=canceled)
    assert pipe.execute() == [int(cancel)]
    ((_, fields),) = r.xrange(store.EVENTS.format("j1"))
    assert fields[b"event"] == (Event.CANCELED if cancel else Event.DONE).encode()
    assert store.get_result(r, "j1")["status"] == ("canceled" if cancel else "finished")


def test_a_claimed_job_whose_result_is_stored_is_settled_not_run_again(r: redis.Redis) -> None:
    """The worker stores a batch's results, then settles the jobs in RQ with its next
    command: a worker that dies in between leaves claims of ended jobs, which the reaper
    ends in RQ as they ended instead of putting them back in the queue."""
    done_id, lost_id = _queued(r, 2)
    batching.claim(r, GROUP, QUEUE, "w.1.dead", 10, 600, START)
    done = store.Ending(Event.DONE, {"status": "finished"}, {"status": "finished"})
    store.finish(r, done_id, done, 60)
    requeued = batching.requeue_lost(r, lambda _: False, lambda _: None, 60, 600)
    assert requeued == [lost_id]
    assert r.lrange(f"rq:queue:{QUEUE}", 0, -1) == [lost_id.encode()]
    assert r.hget(f"rq:job:{done_id}", "status") == b"finished"
    assert not r.hlen(batching.CLAIMS)


def test_published_graph_names_expire(r: redis.Redis) -> None:
    """Names of a revision no worker captures any more must not refuse layers for good."""
    store.publish_graph(r, "m", "rev1", ["conv1", "fc"])
    assert 0 < r.ttl(store.GRAPH.format("m")) <= store.GRAPH_TTL_S


def test_a_retried_final_write_keeps_the_ending_clients_saw(r: redis.Redis) -> None:
    """The worker's client retries a write whose reply was lost: a cancel that came between
    the two tries must not turn the ``done`` already written into ``canceled``."""
    done = store.Ending(Event.DONE, {"status": "finished"}, {"status": "finished"})
    canceled = store.Ending(Event.CANCELED, {"type": "JobCanceled"}, {"status": "canceled"})
    replies = []
    for _ in range(2):
        pipe = r.pipeline(transaction=False)
        store.finish(pipe, "j2", done, 60, 100, if_canceled=canceled)
        replies += pipe.execute()
        store.request_cancel(r, "j2", 60)
    assert replies == [0, 0]
    assert [f[b"event"] for _, f in r.xrange(store.EVENTS.format("j2"))] == [b"done"]
    assert store.get_result(r, "j2")["status"] == "finished"


def test_a_served_models_names_are_kept_from_expiring(r: redis.Redis) -> None:
    """A warm model is captured once: the heartbeat of a worker that holds it pushes the
    expiry of its names out; a model no worker holds keeps its countdown."""
    store.publish_graph(r, "warm", "rev1", ["fc"])
    store.publish_graph(r, "gone", "rev1", ["fc"])
    for model_id in ("warm", "gone"):
        r.expire(store.GRAPH.format(model_id), 5)
    store.keep_graphs(r, ["warm"])
    assert r.ttl(store.GRAPH.format("warm")) > 5 >= r.ttl(store.GRAPH.format("gone"))


def test_the_first_ending_stands(r: redis.Redis) -> None:
    """A worker that outlived its job (the reaper failed it, or Redis lost the job and the
    stream said so) must not write after the ending its clients were sent: no progress, no
    second ending, no other document."""
    error = store.Ending(Event.ERROR, {"type": "JobTimeout"}, {"status": "failed"})
    store.finish(r, "j3", error, 60, 100)
    store.add_event(r, "j3", Event.TOKEN, {"step": 0}, 60, 100)
    done = store.Ending(Event.DONE, {"status": "finished"}, {"status": "finished"})
    canceled = store.Ending(Event.CANCELED, {"type": "JobCanceled"}, {"status": "canceled"})
    pipe = r.pipeline(transaction=False)
    store.finish(pipe, "j3", done, 60, 100, if_canceled=canceled)
    store.finish(pipe, "j3", done, 60, 100)
    assert pipe.execute()[0] == 0
    assert [f[b"event"] for _, f in r.xrange(store.EVENTS.format("j3"))] == [b"error"]
    assert store.get_result(r, "j3")["status"] == "failed"
