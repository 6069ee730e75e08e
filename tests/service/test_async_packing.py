"""The API's Redis clients pack commands with hiredis (``service.api.deps``): the same bytes
on the wire as redis-py's own packer, for every kind of argument the API sends."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aredis

from service.api.deps import AsyncClients

ARGS = [
    ("SET", "key", "é ü", 7, 1.5),
    ("CONFIG GET", "maxmemory"),
    (b"CONFIG GET", "maxmemory"),
    ("XADD", b"bt:events:x", "*", "data", memoryview(b"raw"), bytearray(b"more")),
    ("XADD", b"bt:events:x", "*", "data", memoryview(b"raw")),
    ("EVAL", "return 1", 0, -3, 0.30000000000000004, 1e-7),
]


@pytest.mark.parametrize("args", ARGS)
def test_packed_as_redis_py_packs(args: tuple) -> None:
    ours = AsyncClients("redis://127.0.0.1:1").get("enqueue").connection_pool.make_connection()
    assert type(ours) is not aredis.Connection
    assert b"".join(ours.pack_command(*args)) == b"".join(aredis.Connection().pack_command(*args))


def test_unencodable_argument_is_a_data_error() -> None:
    ours = AsyncClients("redis://127.0.0.1:1").get("enqueue").connection_pool.make_connection()
    with pytest.raises(redis.DataError):
        ours.pack_command("SET", "key", object())


def test_round_trip(redis_url: str) -> None:
    async def run() -> list:
        clients = AsyncClients(redis_url)
        ar = clients.get("enqueue")
        script = "return {ARGV[1], ARGV[2], ARGV[3]}"
        got = await ar.eval(script, 0, "é", 3, 2.5)
        await clients.aclose()
        return got

    assert asyncio.run(run()) == ["é".encode(), b"3", b"2.5"]


def _stock(clients: AsyncClients, purpose: str) -> aredis.Redis:
    client = clients.get(purpose)
    client.connection_pool.connection_class = aredis.Connection
    return client


def test_large_command_sent_whole(redis_url: str) -> None:
    """A command larger than the socket takes at once (8 MiB) is waited for, not cut."""

    async def run() -> bytes:
        clients = AsyncClients(redis_url)
        ar = clients.get("enqueue")
        await ar.set("packing:big", b"x" * (8 << 20))
        got = await ar.get("packing:big")
        await clients.aclose()
        return got

    assert asyncio.run(run()) == b"x" * (8 << 20)


@pytest.mark.parametrize("ours", [True, False])
def test_a_killed_connection_fails_as_redis_pys(redis_url: str, ours: bool) -> None:
    """A connection Redis closed under the client: the next command ends as it does with
    redis-py's own connection (a reconnect, or its ConnectionError), and the one after works."""

    async def run() -> tuple[str, bytes | None]:
        clients = AsyncClients(redis_url)
        ar = clients.get("enqueue") if ours else _stock(clients, "enqueue")
        await ar.set("packing:k", b"v")
        me = await ar.client_id()
        await redis.asyncio.Redis.from_url(redis_url).client_kill_filter(_id=me)
        try:
            first = repr(await ar.get("packing:k"))
        except redis.RedisError as exc:
            first = type(exc).__name__
        after = await ar.get("packing:k")
        await clients.aclose()
        return first, after

    first, after = asyncio.run(run())
    assert after == b"v"
    assert first in ("b'v'", "ConnectionError")
