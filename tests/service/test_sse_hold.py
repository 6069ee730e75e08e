"""The SSE relay's hold (``service.api.sse``), against a real Redis: a short job's lifecycle
events go out with its terminal event in one chunk; progress is never held; and the hold
ends on time however fast events arrive."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aredis

from service.api.deps import AsyncClients
from service.api.first_events import FirstEvents
from service.api.hub import StreamHub
from service.api.metrics import ApiMetrics
from service.api.sse import SSE_HOLD_S, Draining, EventStreams, _events

KEY = "bt:events:{}"


async def _first_chunks(url: str, job: str, writer, n: int) -> list[tuple[float, str]]:
    """The first ``n`` chunks the relay yields for ``job`` while ``writer(w)`` writes events
    (an async callable on its own client), each with the seconds since the relay started."""
    clients, w = AsyncClients(url), aredis.Redis.from_url(url)
    metrics = ApiMetrics(redis.Redis.from_url(url), "q")
    streams = EventStreams(
        clients.get("sse"), 15.0, metrics, Draining(), StreamHub(clients), FirstEvents()
    )
    task = asyncio.create_task(writer(w))
    t0, chunks = time.monotonic(), []
    gen = _events(streams, job, "0-0")
    async for chunk in gen:
        chunks.append((time.monotonic() - t0, chunk))
        if len(chunks) == n:
            break
    await gen.aclose()
    task.cancel()
    await clients.aclose()
    await w.aclose()
    return chunks


def test_a_short_jobs_events_leave_in_one_chunk(redis_url: str) -> None:
    async def job(w: aredis.Redis) -> None:
        for event in ("queued", "started", "done"):
            await w.xadd(KEY.format("short"), {"event": event, "data": "{}"})
            await asyncio.sleep(0.003)

    ((_, chunk),) = asyncio.run(_first_chunks(redis_url, "short", job, 1))
    assert [x for x in chunk.split("\n") if x.startswith("event:")] == [
        "event: queued",
        "event: started",
        "event: done",
    ]


def test_progress_is_not_held(redis_url: str) -> None:
    async def job(w: aredis.Redis) -> None:
        await w.xadd(KEY.format("tokens"), {"event": "queued", "data": "{}"})
        await asyncio.sleep(0.002)
        await w.xadd(KEY.format("tokens"), {"event": "token", "data": "{}"})
        await asyncio.sleep(10)

    ((elapsed, chunk),) = asyncio.run(_first_chunks(redis_url, "tokens", job, 1))
    assert "event: token" in chunk and elapsed < SSE_HOLD_S


def test_the_hold_ends_on_time_under_a_flood_of_events(redis_url: str) -> None:
    """Lifecycle events arriving faster than the relay reads them (a flood, as under a
    loaded API) must not stretch the hold: each read finding data used to extend it."""

    async def flood(w: aredis.Redis) -> None:
        while True:
            await w.xadd(KEY.format("flood"), {"event": "retrying", "data": "{}"})
            await asyncio.sleep(0.0005)

    chunks = asyncio.run(_first_chunks(redis_url, "flood", flood, 3))
    assert chunks[0][0] < SSE_HOLD_S + 0.05, chunks[0][0]
