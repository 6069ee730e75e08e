"""A job that a worker took from the queue (RQ moves it to the queue's intermediate list)
and never started, because the worker died in between (Redis refused its next write, out
of memory, and RQ's loop raised): the API's reaper puts it back at the front of the queue
within seconds and tells its clients. It said ``queued`` while in no queue until a worker's
maintenance, minutes later, failed or retried it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from service import store
from tests.helpers.databases import own_database
from tests.helpers.stack import Stack
from tests.service.test_reaper_entries import lone_api

DB, QUEUE, TTL = 10, "untaken-test", 1  # lone_api's heartbeat TTL
JOB = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}


@pytest.fixture()
def api(redis_url: str, stack: Stack) -> Iterator[tuple[str, redis.Redis]]:
    """An API on a database of its own, with no worker."""
    r = next(own_database(redis_url, DB))
    with lone_api(stack, DB, QUEUE, "untaken-api.log") as url:
        yield url, r
    r.flushdb()


def test_a_job_taken_but_never_started_goes_back_to_the_queue(api) -> None:
    url, r = api
    first, second = (httpx.post(f"{url}/run_task", json=JOB).json()["job_id"] for _ in range(2))
    queue, intermediate = f"rq:queue:{QUEUE}", f"rq:queue:{QUEUE}:intermediate"
    assert r.lmove(queue, intermediate, "LEFT", "RIGHT").decode() == first  # as RQ dequeues
    deadline = time.monotonic() + 10 * TTL + 5
    while r.llen(intermediate) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [j.decode() for j in r.lrange(queue, 0, -1)] == [first, second]
    events = [(f[b"event"], f[b"data"]) for _, f in r.xrange(store.EVENTS.format(first))]
    assert [e for e, _ in events] == [b"queued", b"retrying"]
    assert b"stopped before starting it" in events[1][1]
    assert httpx.get(f"{url}/jobs/{first}").json()["status"] == "queued"


def test_a_job_being_started_is_left_alone(api) -> None:
    """Out of the queue but started (RQ's prepare ran): not the reaper's."""
    url, r = api
    job_id = httpx.post(f"{url}/run_task", json=JOB).json()["job_id"]
    intermediate = f"rq:queue:{QUEUE}:intermediate"
    r.lmove(f"rq:queue:{QUEUE}", intermediate, "LEFT", "RIGHT")
    r.hset(f"rq:job:{job_id}", "status", "started")
    time.sleep(4 * TTL + 1)
    assert [j.decode() for j in r.lrange(intermediate, 0, -1)] == [job_id]
    assert not r.llen(f"rq:queue:{QUEUE}")
