"""The edges of the API process's shared stream read (``service.api.hub``), against a real
Redis: a reader cancelled just as its entries arrive (its client gone, the server draining)
is cancelled, not handed the entries; a reader that comes while the hub asks its new
connection's id is in the read that follows; the hub's clients closed under its read (the
API's shutdown) end the hub without an exception and fail its waiting readers at once; an
error a cancelled reader never waited for is not logged as never retrieved."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import redis.asyncio as aredis

from service.api import hub as hub_module
from service.api.deps import AsyncClients
from service.api.hub import HUB_BLOCK_S, WAKE_LATER_S, StreamHub

ENTRY = {"event": "queued", "data": "{}"}


async def _with_hub(url: str, body) -> None:
    clients = AsyncClients(url, {"hub": {"single_connection_client": True}})
    w = aredis.Redis.from_url(url)
    try:
        await body(StreamHub(clients), w)
    finally:
        await clients.aclose()
        await w.aclose()


def test_a_reader_cancelled_as_its_entries_arrive_is_cancelled(redis_url: str) -> None:
    """asyncio.wait_for (Python 3.11) returns the result of a future that is done when the
    cancellation comes, and the cancellation is lost: a stream whose client went away went
    on sending to nobody until its job ended, and one told to drain never sent its note."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        key = "hub:edge:cancel"
        reader = asyncio.ensure_future(hub.read(key, "0-0", 5))
        await asyncio.sleep(0.2)  # waiting in the hub's read
        hand_out = hub._hand_out

        def hand_out_then_cancel(reply: list) -> None:
            hand_out(reply)
            reader.cancel()  # the client goes away just as its entries arrive

        hub._hand_out = hand_out_then_cancel  # type: ignore[method-assign]
        await w.xadd(key, ENTRY)
        with pytest.raises(asyncio.CancelledError):
            await reader  # before: the entries, the cancellation swallowed

    asyncio.run(_with_hub(redis_url, body))


def test_a_reader_that_comes_while_the_hub_connects_is_in_its_next_read(redis_url: str) -> None:
    """The hub names the streams to read after it has its connection's id (a round trip, and
    a connection's handshake after Redis came back): a reader that came meanwhile waited for
    the whole block of a read without its stream (no unblock: the id was not known yet)."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        conn = hub.clients.get("hub")
        client_id = conn.client_id

        async def slow_client_id() -> int:
            await asyncio.sleep(0.2)  # connecting, as to a Redis that just came back
            return await client_id()

        conn.client_id = slow_client_id  # type: ignore[method-assign]
        quiet = asyncio.ensure_future(hub.read("hub:edge:quiet", "0-0", 5))
        await asyncio.sleep(0.05)  # the hub asks its connection's id
        await w.xadd("hub:edge:new", ENTRY)
        t0 = time.monotonic()
        reply = await hub.read("hub:edge:new", "0-0", 5)
        assert reply and time.monotonic() - t0 < 0.2 + HUB_BLOCK_S / 2  # before: a block more
        quiet.cancel()

    asyncio.run(_with_hub(redis_url, body))


def test_the_hubs_clients_closed_under_its_read_end_it_and_fail_its_readers(
    redis_url: str,
) -> None:
    """redis-py fails a read whose client was closed under it with its pool's KeyError, not a
    Redis error: the hub's task died of it (an exception never retrieved), and its readers
    waited out their blocks for nothing."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        waiting = asyncio.ensure_future(hub.read("hub:edge:closed", "0-0", 5))
        await asyncio.sleep(0.2)
        await hub.clients.aclose()  # as the API's lifespan does at shutdown
        done, _ = await asyncio.wait([waiting], timeout=HUB_BLOCK_S)
        assert done and waiting.exception() is not None  # before: None, after 5 s
        await asyncio.sleep(0.3)
        assert hub.task is not None and hub.task.done() and hub.task.exception() is None
        await w.xadd("hub:edge:after", ENTRY)
        assert await hub.read("hub:edge:after", "0-0", 5)  # the next reader starts a new one

    asyncio.run(_with_hub(redis_url, body))


def test_an_error_a_cancelled_reader_never_waited_for_is_not_logged(redis_url: str) -> None:
    """A reader cancelled while it unblocks the hub's read, as that read fails: its future
    holds the error, and asyncio logged 'Future exception was never retrieved'."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        logged: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: logged.append(context["message"]))
        quiet = asyncio.ensure_future(hub.read("hub:edge:q2", "0-0", 5))
        await asyncio.sleep(0.2)
        sse = hub.clients.get("sse")
        unblock = sse.client_unblock

        async def slow_unblock(client_id: int) -> bool:
            await asyncio.sleep(0.5)
            return await unblock(client_id)

        sse.client_unblock = slow_unblock  # type: ignore[method-assign]
        late = asyncio.ensure_future(hub.read("hub:edge:late", "0-0", 5))
        await asyncio.sleep(0.05)  # it unblocks the read
        await w.client_kill_filter(_id=hub.hub_id)  # the read fails (Redis restarting)
        await asyncio.sleep(0.1)
        late.cancel()  # its client goes away
        await asyncio.gather(quiet, late, return_exceptions=True)
        del quiet, late
        gc.collect()
        await asyncio.sleep(0)
        assert not [m for m in logged if "never retrieved" in m], logged

    asyncio.run(_with_hub(redis_url, body))


def _count_unblocks(hub: StreamHub) -> list[int]:
    """The CLIENT UNBLOCKs the hub sends, counted as they go out."""
    sent: list[int] = []
    sse = hub.clients.get("sse")
    unblock = sse.client_unblock

    async def counted(client_id: int) -> bool:
        sent.append(client_id)
        return await unblock(client_id)

    sse.client_unblock = counted  # type: ignore[method-assign]
    return sent


def test_a_reader_that_can_wait_joins_the_next_read_without_a_wake(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream holding back its first events (not ``urgent``) lets the read in flight
    return with another stream's entry, and is in the read after it: no unblock sent (each
    new stream used to wake the read at once, a CLIENT UNBLOCK and a read sent again for
    nothing, most of them under load). The wake's delay is made long here, so that a slow
    machine cannot send it before the read returns."""
    monkeypatch.setattr(hub_module, "WAKE_LATER_S", 2.0)

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        sent = _count_unblocks(hub)
        busy = asyncio.ensure_future(hub.read("hub:edge:busy", "0-0", 5))
        await asyncio.sleep(0.2)  # the hub's read blocks on the busy stream alone
        await w.xadd("hub:edge:joins", ENTRY)
        joins = asyncio.ensure_future(hub.read("hub:edge:joins", "0-0", 5, urgent=False))
        await w.xadd("hub:edge:busy", ENTRY)  # the read returns with it
        assert await joins and await busy
        assert sent == []

    asyncio.run(_with_hub(redis_url, body))


def test_a_reader_that_can_wait_wakes_a_quiet_read_soon(redis_url: str) -> None:
    """Where the read in flight stays quiet, the reader that can wait wakes it after
    ``WAKE_LATER_S``, not after the read's whole block."""

    async def body(hub: StreamHub, w: aredis.Redis) -> None:
        sent = _count_unblocks(hub)
        quiet = asyncio.ensure_future(hub.read("hub:edge:quiet2", "0-0", 5))
        await asyncio.sleep(0.2)
        await w.xadd("hub:edge:late2", ENTRY)
        t0 = time.monotonic()
        assert await hub.read("hub:edge:late2", "0-0", 5, urgent=False)
        assert time.monotonic() - t0 < WAKE_LATER_S + HUB_BLOCK_S / 4
        assert len(sent) <= 1  # none where the read had not been sent yet
        quiet.cancel()

    asyncio.run(_with_hub(redis_url, body))
