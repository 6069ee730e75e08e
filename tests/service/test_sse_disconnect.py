"""A client that goes away from a quiet event stream (``service.api.sse``), against a real
Redis: the stream ends when the server hears the disconnect, not at the next keep-alive
write, and a stream that ends by itself is not cut short by the watch. Starlette's own watch
(an anyio task group per response) passed these too; they guard the behaviour now that
``EventStreamResponse`` watches with a task of its own, which is cheaper (measured in-process:
a short job's stream 277 -> 192 us of CPU), not faster by any test here."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis

from service.api.deps import AsyncClients
from service.api.first_events import FirstEvents
from service.api.hub import StreamHub
from service.api.metrics import ApiMetrics
from service.api.sse import Draining, EventStreams

KEEPALIVE_S = 15.0


async def _serve(url: str, job: str, disconnect_after: float | None) -> tuple[float, list, float]:
    """Run the job's stream as the ASGI app it is; the client disconnects after
    ``disconnect_after`` seconds (None: never). Returns the seconds it ran, the messages
    sent and the connected-clients gauge after it."""
    clients = AsyncClients(url)
    metrics = ApiMetrics(redis.Redis.from_url(url), "q")
    streams = EventStreams(
        clients.get("sse"), KEEPALIVE_S, metrics, Draining(), StreamHub(clients), FirstEvents()
    )
    sent: list[dict] = []

    async def receive() -> dict:
        if disconnect_after is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    t0 = time.monotonic()
    await asyncio.wait_for(streams.response(job)(scope, receive, send), KEEPALIVE_S - 5)
    elapsed = time.monotonic() - t0
    gauge = metrics.sse_clients._value.get()
    await clients.aclose()
    return elapsed, sent, gauge


def _job(url: str, events: list[str]) -> str:
    r = redis.Redis.from_url(url)
    job = uuid.uuid4().hex
    for event in events:
        r.xadd(f"bt:events:{job}", {"event": event, "data": "{}"})
    r.hset(f"rq:job:{job}", mapping={"status": "queued"})
    r.expire(f"bt:events:{job}", 60)
    r.expire(f"rq:job:{job}", 60)
    return job


def test_a_quiet_stream_ends_when_its_client_goes_away(redis_url: str) -> None:
    elapsed, sent, clients = asyncio.run(_serve(redis_url, _job(redis_url, ["queued"]), 0.3))
    assert elapsed < 2.0  # the keep-alive write would have come after 15 s
    assert clients == 0
    assert b"event: queued" in b"".join(m.get("body", b"") for m in sent)


def test_a_stream_that_ends_is_whole(redis_url: str) -> None:
    job = _job(redis_url, ["queued", "started", "done"])
    elapsed, sent, clients = asyncio.run(_serve(redis_url, job, None))
    body = b"".join(m.get("body", b"") for m in sent)
    assert [x for x in body.split(b"\n") if x.startswith(b"event:")] == [
        b"event: queued",
        b"event: started",
        b"event: done",
    ]
    assert sent[-1]["more_body"] is False and clients == 0 and elapsed < 2.0
