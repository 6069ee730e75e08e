"""The API process's shared read of its event streams (``service.api.hub``), against a real
Redis: each reader gets the entries of its own stream after its own id, whatever the others
wait for; a reader that comes while the shared XREAD blocks is let in at once (not after the
read's block); many open streams hold a couple of Redis connections, not one each (each
stream's blocking read held one: Redis refuses clients past ``maxclients``, and then the
workers cannot connect either)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aredis

from service.api.deps import AsyncClients
from service.api.hub import HUB_BLOCK_S, StreamHub
from tests.helpers.jobs import submit
from tests.helpers.stack import Stack, start_api


async def _with_hub(url: str, body) -> object:
    clients = AsyncClients(url)
    try:
        return await body(StreamHub(clients), aredis.Redis.from_url(url))
    finally:
        await clients.aclose()


def _ids(reply) -> list[str]:
    return [entry_id.decode() for entry_id, _ in reply[0][1]] if reply else []


def test_each_reader_gets_its_own_streams_entries_after_its_own_id(redis_url: str) -> None:
    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        keys = [f"hub:a:{i}" for i in range(12)]
        first = {k: (await w.xadd(k, {"event": "queued", "data": "{}"})).decode() for k in keys}
        readers = [hub.read(k, first[k], 5) for k in keys]  # each after its first entry
        readers += [hub.read(keys[0], "0-0", 5)]  # a second reader of one stream, from the start
        tasks = [asyncio.ensure_future(r) for r in readers]
        await asyncio.sleep(0.05)
        later = {}
        for k in reversed(keys):
            later[k] = (await w.xadd(k, {"event": "done", "data": "{}"})).decode()
        replies = await asyncio.gather(*tasks)
        for k, reply in zip(keys, replies, strict=False):
            assert reply[0][0].decode() == k and _ids(reply) == [later[k]]
        assert _ids(replies[-1])[0] == first[keys[0]]  # its own id: from the start

    asyncio.run(_with_hub(redis_url, body))


def test_a_reader_that_comes_while_the_read_blocks_is_let_in_at_once(redis_url: str) -> None:
    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        quiet = asyncio.ensure_future(hub.read("hub:b:quiet", "0-0", 5))
        await asyncio.sleep(0.2)  # the shared XREAD now blocks on the quiet stream alone
        assert hub.reading == {"hub:b:quiet": "0-0"}
        await w.xadd("hub:b:new", {"event": "queued", "data": "{}"})
        t0 = time.monotonic()
        reply = await hub.read("hub:b:new", "0-0", 5)
        assert len(_ids(reply)) == 1 and time.monotonic() - t0 < HUB_BLOCK_S / 2
        assert await hub.read("hub:b:gone", "0-0", 0.1) is None  # nothing came: a keep-alive
        quiet.cancel()

    asyncio.run(_with_hub(redis_url, body))


def test_an_unblock_that_overtakes_the_read_is_sent_again(redis_url: str) -> None:
    """The unblock goes on another connection than the read, and Redis can take it first,
    before the read blocks: it unblocks nothing, and the new reader waited out the whole
    block. Here the read (on a connection of the test's own, as the hub's) starts 5 ms
    after the unblock was sent."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        hub.hub_id, hub.reading = await w.client_id(), {"hub:c:old": "0-0"}
        waking = asyncio.ensure_future(hub._wake())
        await asyncio.sleep(0.005)
        t0 = time.monotonic()
        await w.xread({"hub:c:old": "$"}, block=2000)  # blocks until unblocked
        assert time.monotonic() - t0 < 0.5  # before: the whole 2 s
        await waking

    asyncio.run(_with_hub(redis_url, body))


@pytest.fixture
def lonely_api(stack: Stack) -> Iterator[tuple[str, redis.Redis]]:
    """An API on Redis database 4 of the session's server, with no worker: its jobs stay
    queued, and their streams open."""
    url = stack.redis_url.rsplit("/", 1)[0] + "/4"
    r = redis.Redis.from_url(url)
    r.flushdb()
    proc, api = start_api({**stack.env, "REDIS_URL": url}, stack.tmp / "hub-api.log")
    try:
        yield api, r
    finally:
        proc.terminate()
        proc.wait(30)
        r.flushdb()


def test_many_open_streams_hold_a_couple_of_redis_connections(lonely_api) -> None:
    """Streams opened one after another (so that the API's other reads never run side by
    side), each then waiting for its queued job: the connections to Redis grow by the
    hub's one, not by one per stream."""
    api, r = lonely_api
    n = 40
    body = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}
    with httpx.Client(base_url=api, timeout=30) as client:
        jobs = [submit(client, body)["job_id"] for _ in range(n)]
        client.get(f"/jobs/{jobs[0]}")  # the API's clients are connected

    async def follow_all() -> int:
        before = int(r.info("clients")["connected_clients"])
        async with httpx.AsyncClient(base_url=api, timeout=60) as client:
            opened = []
            for job in jobs:
                stream = client.stream("GET", f"/jobs/{job}/events")
                resp = await stream.__aenter__()
                lines = resp.aiter_lines()
                while not (await anext(lines)).startswith("event: queued"):
                    pass
                opened.append(stream)
            await asyncio.sleep(1.0)  # past the hold: every stream now waits for its job
            during = int(r.info("clients")["connected_clients"])
            for stream in opened:
                await stream.__aexit__(None, None, None)
        return during - before

    assert asyncio.run(follow_all()) <= 3  # before: one connection per open stream
