"""Streams of jobs that wait: a quiet stream sends keep-alives (never a Redis outage that is
not one) and ends with the job's final event; while no worker is alive the job view and the
stream say so; a Last-Event-ID after the job's last event is a 400, and the ending's own a 204,
not a hang.

A second API on Redis database 1 of the session's server has no worker at all, so its jobs
stay queued as long as the test wants. Its keep-alive is 6 s: longer than redis-py's default
socket timeout (5 s), which is how the production default (15 s) misreported quiet streams."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from service import store
from service.client import Client, parse_sse
from service.vocabulary import Event, JobStatus
from tests.helpers.jobs import events, submit
from tests.helpers.stack import Stack, start_api

JOB = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}


@pytest.fixture(scope="module")
def lonely(stack: Stack) -> Iterator[tuple[httpx.Client, redis.Redis]]:
    url = stack.redis_url.rsplit("/", 1)[0] + "/1"
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {**stack.env, "REDIS_URL": url, "BACKTRACE_SSE_KEEPALIVE": "6"}
    proc, api = start_api(env, stack.tmp / "lonely-api.log")
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            yield client, r
    finally:
        proc.terminate()
        proc.wait(30)
        r.flushdb()


def test_queued_job_gets_keepalives_then_done(lonely) -> None:
    client, r = lonely
    job = submit(client, JOB)["job_id"]
    view = client.get(f"/jobs/{job}").json()
    assert view["status"] == JobStatus.QUEUED and view["workers_alive"] == 0
    assert "no worker is alive" in view["note"]

    def worker_comes_then_finishes() -> None:
        time.sleep(8)
        store.heartbeat(r, "test-worker", {"models": []}, ttl=30)
        time.sleep(5)
        doc = {"status": JobStatus.FINISHED, "model": JOB["model"], "task": "generation"}
        store.finish(r, job, store.Ending(Event.DONE, {"ok": True}, doc), ttl=60)

    helper = threading.Thread(target=worker_comes_then_finishes)
    helper.start()
    comments: list[str] = []
    t0 = time.monotonic()
    evs = events(client, job, comments=comments)
    helper.join()
    assert [e for _, e, _ in evs] == ["queued", "done"]
    assert time.monotonic() - t0 > 12
    assert comments, "a quiet stream sends comments"
    assert not [c for c in comments if "unavailable" in c], comments
    assert "no worker is alive" in comments[0] and comments[-1] == ": keep-alive", comments
    assert "workers_alive" not in client.get(f"/jobs/{job}").json()


def test_last_event_id_after_the_last_event_is_400(lonely) -> None:
    client, _ = lonely
    job = submit(client, JOB)["job_id"]
    t0 = time.monotonic()
    resp = client.get(f"/jobs/{job}/events", headers={"Last-Event-ID": "99999999999999-0"})
    assert resp.status_code == 400 and "after the job's last event" in resp.json()["detail"]
    assert time.monotonic() - t0 < 5
    (first_id, event, _), *_ = _first_event(client, job)
    assert event == "queued"
    client.delete(f"/jobs/{job}")
    resumed = events(client, job, last_id=first_id)
    assert [e for _, e, _ in resumed] == ["canceled"]


def test_resuming_after_the_ending_is_204(lonely) -> None:
    """EventSource reconnects by itself whenever a stream closes, with the id of the last
    event it had: after a job's ending that is the ending's id, and the stream stayed open
    with keep-alives for good. Now a 204, which tells EventSource to stop; the Python
    client's resume ends too."""
    client, _ = lonely
    job = submit(client, JOB)["job_id"]
    client.delete(f"/jobs/{job}")
    (*_, (ending_id, event, _)) = events(client, job)
    assert event == "canceled"
    t0 = time.monotonic()
    resp = client.get(f"/jobs/{job}/events", headers={"Last-Event-ID": ending_id})
    assert resp.status_code == 204 and not resp.content
    assert list(Client(str(client.base_url)).stream(job, last_event_id=ending_id)) == []
    assert time.monotonic() - t0 < 5


def _first_event(client: httpx.Client, job: str) -> list[tuple[str, str, dict]]:
    """The job's first event, read with a short timeout (the job is still queued)."""
    with client.stream("GET", f"/jobs/{job}/events") as resp:
        for event, data, eid in parse_sse(resp.iter_lines()):
            return [(eid, event, data)]
    return []


def test_a_job_whose_keys_are_lost_ends_its_stream_with_a_kept_error(lonely) -> None:
    """Redis lost the job (its keys expired, or its data was wiped) while a client follows
    it: the stream ends with an error that says so, and the stream that error is written to
    expires (it was made anew, with no expiry, and stayed for good)."""
    client, r = lonely
    job = submit(client, JOB)["job_id"]

    def lose_the_job() -> None:
        time.sleep(1)
        r.delete(f"rq:job:{job}", store.EVENTS.format(job))
        r.lrem("rq:queue:default", 0, job)

    helper = threading.Thread(target=lose_the_job)
    helper.start()
    evs = events(client, job)
    helper.join()
    assert [e for _, e, _ in evs] == ["queued", "error"]
    assert "no longer in Redis" in evs[-1][2]["message"]
    assert 0 < r.ttl(store.EVENTS.format(job)) <= 3600


def test_a_stream_of_a_job_just_accepted_starts_without_a_read(lonely) -> None:
    """The API keeps the ``queued`` event of the jobs it accepts (``first_events``): the
    client's GET of the events right after its POST starts with it, with no read of the
    job's Redis stream (only the shared blocking read that waits for what follows); a
    second GET of the same job reads it first, and gets the same event."""
    client, r = lonely
    job = submit(client, JOB)["job_id"]
    with _commands(r) as seen:
        first = _first_event(client, job)
        r.echo("second")
        again = _first_event(client, job)
    assert [e for _, e, _ in first] == ["queued"] and first == again
    reads = [c for c in seen if c.startswith("XREAD") and job in c]
    second = seen.index("ECHO second")
    assert [c.startswith("XREAD BLOCK") for c in seen[:second] if c in reads] == [True]
    assert not reads[1].startswith("XREAD BLOCK"), reads  # the second GET's read


@contextlib.contextmanager
def _commands(r: redis.Redis) -> Iterator[list[str]]:
    """The commands Redis runs meanwhile (MONITOR), as text."""
    seen: list[str] = []

    def watch() -> None:
        with r.monitor() as m:
            for c in m.listen():
                if c["command"] == "ECHO end":
                    return
                seen.append(c["command"])

    thread = threading.Thread(target=watch)
    thread.start()
    while not any("O" in c["flags"] for c in r.client_list()):
        time.sleep(0.01)
    try:
        yield seen
    finally:
        r.echo("end")
        thread.join(10)
