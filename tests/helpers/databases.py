"""A Redis database of a test module's own on the session's private server, emptied before
and after: modules that write RQ's keys directly stay out of the database the session's
service reaps and claims from (0)."""

from __future__ import annotations

from collections.abc import Iterator

import redis


def own_database(redis_url: str, number: int) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{number}")
    conn.flushdb()
    yield conn
    conn.flushdb()
