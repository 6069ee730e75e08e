"""An API process told to stop (SIGTERM: a rolling update, a scale-down) while clients follow
job streams: it exits within seconds, each open stream ends with a comment that tells its
client to reconnect, and a client that reconnects to another API process with Last-Event-ID
gets the rest of the job's events. uvicorn waits for open responses to end before it exits,
and a job's stream ends only with the job: an API with a stream open on a queued job never
exited (Kubernetes killed it after its grace period, cutting every stream without a word).

The API processes here have no worker (Redis database 3 of the session's server), so their
jobs stay queued for as long as the test wants."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from service import store
from service.client import parse_sse
from service.vocabulary import Event, JobStatus
from tests.helpers.jobs import events, submit
from tests.helpers.stack import Stack, start_api

JOB = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}


@pytest.fixture
def no_worker(stack: Stack) -> Iterator[tuple[dict[str, str], redis.Redis]]:
    url = stack.redis_url.rsplit("/", 1)[0] + "/3"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield {**stack.env, "REDIS_URL": url}, r
    r.flushdb()


class Follower(threading.Thread):
    """Reads a job's event stream to its end, keeping each event and comment line."""

    def __init__(self, api: str, job: str, post: bool = False):
        super().__init__(daemon=True)
        self.api, self.job, self.post = api, job, post
        self.events: list[tuple[str, str]] = []  # (id, event)
        self.comments: list[str] = []
        self.error: Exception | None = None
        self.started_reading = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.api, timeout=60) as client:
                if self.post:
                    headers = {"Accept": "text/event-stream"}
                    cm = client.stream("POST", "/run_task", json=JOB, headers=headers)
                else:
                    cm = client.stream("GET", f"/jobs/{self.job}/events")
                with cm as resp:
                    for event, _, eid in parse_sse(self._lines(resp)):
                        self.events.append((eid, event))
                        self.started_reading.set()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc

    def _lines(self, resp: httpx.Response) -> Iterator[str]:
        for line in resp.iter_lines():
            if line.startswith(":"):
                self.comments.append(line)
            yield line


def test_sigterm_ends_open_streams_with_a_reconnect_note_and_the_api_exits(
    stack: Stack, no_worker
) -> None:
    env, r = no_worker
    proc, api = start_api(env, stack.tmp / "drained-api.log")
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            job = submit(client, JOB)["job_id"]
        followers = [Follower(api, job), Follower(api, job, post=True)]
        for f in followers:
            f.start()
            assert f.started_reading.wait(30), f.error
        time.sleep(0.5)  # both now wait in a blocking read of a quiet job
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)  # before: never (uvicorn waits for the streams, which never end)
        assert time.monotonic() - t0 < 10
        for f in followers:
            f.join(10)
            assert not f.is_alive() and f.error is None, f.error
            assert [e for _, e in f.events] == [Event.QUEUED], f.events
            assert any("reconnect" in c for c in f.comments), f.comments
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # The client reconnects, to the API that replaced this one, with the last id it got.
    proc, api = start_api(env, stack.tmp / "second-api.log")
    try:
        last_id = followers[0].events[-1][0]
        doc = {"status": JobStatus.FINISHED, "model": JOB["model"], "task": "generation"}
        store.finish(r, job, store.Ending(Event.DONE, {"ok": True}, doc), ttl=60)
        with httpx.Client(base_url=api, timeout=30) as client:
            rest = events(client, job, last_id=last_id)
        assert [e for _, e, _ in rest] == [Event.DONE]
    finally:
        proc.terminate()
        proc.wait(30)
