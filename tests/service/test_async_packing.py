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
