"""Last-Event-ID values that Redis cannot read as stream ids start the stream from the
beginning, as the events route promises, instead of failing its first read: Redis refuses
"²" (which ``str.isdigit`` takes) and parts of 2**64 or more, and that refusal was a 503
with Retry-After, which EventSource retried for good."""

from __future__ import annotations

import pytest
import redis

from service.api.sse import is_stream_id


@pytest.mark.parametrize(
    "value",
    ["0", "0-0", "007-01", "1700000000000-3", f"{(1 << 64) - 1}-{(1 << 64) - 1}"],
)
def test_what_redis_reads_as_a_stream_id_is_one(redis_url: str, value: str) -> None:
    redis.Redis.from_url(redis_url).xread({"ids:probe": value}, count=1)
    assert is_stream_id(value)


@pytest.mark.parametrize("value", ["²", "١٢-3", str(1 << 64), f"1-{1 << 64}", "-1", "a-1"])
def test_what_redis_refuses_is_not(redis_url: str, value: str) -> None:
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(redis_url).xread({"ids:probe": value}, count=1)
    assert not is_stream_id(value)  # before: "²", "١٢-3" and the 2**64 ones were
