"""The reaper against entries of RQ's started registry that are not ``job_id:execution_id``
(written by hand, or by another program): they are removed, and every other lost job is
still ended. One such entry used to make every pass raise, and the API's reaper task died
at the first, so a dead worker's jobs stayed ``started`` for good."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
from rq.registry import StartedJobRegistry

from service import reaper, store
from tests.helpers.databases import own_database
from tests.helpers.stack import Stack, start_api
from tests.service.test_reaper import QUEUE, _started_by_dead_worker

JUNK = [b"a:b:c", b"\xff\xfe:1"]
DB = 9


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    yield from own_database(redis_url, DB)


def plant_junk(r: redis.Redis) -> str:
    """A dead worker's started job behind junk entries that sort before it."""
    job_id = _started_by_dead_worker(r)
    key = StartedJobRegistry(QUEUE, connection=r).key
    r.zadd(key, {m: 0 for m in JUNK})
    return job_id


def test_junk_entries_are_removed_and_the_lost_job_is_still_reaped(r: redis.Redis) -> None:
    job_id = plant_junk(r)
    assert reaper.reap(r, QUEUE, 0, 60, 600) == [job_id]
    assert r.zrange(StartedJobRegistry(QUEUE, connection=r).key, 0, -1) == []
    events = [f[b"event"] for _, f in r.xrange(store.EVENTS.format(job_id))]
    assert events == [b"retrying"]


@contextmanager
def lone_api(stack: Stack, db: int, queue: str, log: str) -> Iterator[str]:
    """An API on database ``db`` of the session's Redis and ``queue``, with a heartbeat TTL
    of 1 s and no worker: its own reaper loop is the only one."""
    env = {**stack.env, "REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + f"/{db}"}
    env |= {"BACKTRACE_QUEUE": queue, "BACKTRACE_HEARTBEAT_TTL": "1"}
    proc, url = start_api(env, stack.tmp / log)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_apis_reaper_survives_junk_entries(r: redis.Redis, stack: Stack) -> None:
    """The API's own reaper loop (no worker on this database) ends the lost job."""
    with lone_api(stack, DB, QUEUE, "reaper-entries-api.log") as url:
        job_id = plant_junk(r)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not r.exists(store.EVENTS.format(job_id)):
            time.sleep(0.2)
        events = [f[b"event"] for _, f in r.xrange(store.EVENTS.format(job_id))]
        assert events == [b"retrying"]
        assert httpx.get(f"{url}/jobs/{job_id}").json()["status"] == "queued"
