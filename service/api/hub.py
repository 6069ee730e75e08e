"""One blocking XREAD for all the event streams an API process relays.

Each open stream used to wait in a blocking XREAD of its own, and a blocking read holds its
Redis connection for as long as it waits (the keep-alive, 15 s): an API process with N open
streams held N connections. Redis refuses clients past ``maxclients`` (10000 by default),
and then the workers cannot connect either: a few thousand followed jobs on a few API
replicas would stop the whole service. Here the process's streams wait on one connection:
one XREAD names every job stream that someone waits on, each from the earliest id one of
its readers needs, and hands each reader the entries after its own id.

A reader that arrives while that XREAD blocks without its stream is let in by ``CLIENT
UNBLOCK`` of the hub's connection (the read returns empty and is sent again with the new
stream). An unblock that Redis took before the XREAD is sent again (``WAKE_TRIES``); past
those, the read's own block, ``HUB_BLOCK_S``, bounds the delay. A reader that can wait a
little (a stream holding back its first events: ``sse.SSE_HOLD_S``) lets the read in
flight return by itself first: under load it returns within milliseconds with the other
streams' entries, and the next read names the new stream without a wake."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from .deps import AsyncClients

HUB_BLOCK_S = 1.0
# An unblock that found the read not yet blocking in Redis (it was sent on another
# connection and overtook it) is sent again, this often and this far apart, while that read
# is still the one in flight: else the new reader waited out the whole block.
WAKE_TRIES, WAKE_RETRY_S = 10, 0.002
# How long a reader that can wait lets the read in flight return by itself before it wakes
# it: a wake costs a CLIENT UNBLOCK and a read sent again for nothing (0.6-0.8 of each per
# job at 8 concurrent streams, when every new stream woke the read at once).
WAKE_LATER_S = 0.005
# Entries of one stream handed out per read, as each stream's own read took before.
HUB_COUNT = 100


def id_key(stream_id: str) -> tuple[int, int]:
    """A stream id (``123`` or ``123-4``) as what orders it."""
    a, _, b = stream_id.partition("-")
    return int(a), int(b or 0)


@dataclass(eq=False)
class _Reader:
    """A stream's reader: the id after which it wants entries, and where it gets them."""

    last: str
    got: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class StreamHub:
    """The blocking reads of one API process's event streams, as one XREAD on one connection
    (the ``hub`` client of ``clients``: a single connection); the ``sse`` client sends the
    unblocks. Clients are taken on first use, inside the event loop."""

    def __init__(self, clients: AsyncClients):
        self.clients = clients
        self.readers: dict[str, list[_Reader]] = {}
        self.reading: dict[str, str] | None = None  # the XREAD in flight: stream -> id
        self.hub_id: int | None = None  # the hub connection's CLIENT ID
        self.woken = False  # an unblock is sent for the XREAD in flight
        self.round = 0  # XREADs sent so far: which read an unblock was meant for
        self.task: asyncio.Task | None = None
        self.waking: asyncio.Task | None = None  # a wake sent late (``_wake_later``)

    async def read(self, key: str, last: str, block: float, urgent: bool = True) -> Any:
        """The entries of stream ``key`` after ``last`` (XREAD's reply for that one stream),
        or None when none came within ``block`` seconds. Raises the error of the read it
        waited on. A reader that is not ``urgent`` wakes a read in flight without its stream
        only after ``WAKE_LATER_S``, if that read is still blocking by then. Waits with
        ``asyncio.timeout``, not ``wait_for``: on Python 3.11 that one returns the result
        of a future done when the cancellation comes, and a stream whose client went away
        (or whose server drains) as its entries arrived was never ended."""
        reader = _Reader(last)
        self.readers.setdefault(key, []).append(reader)
        try:
            if self.task is None or self.task.done():
                self.task = asyncio.get_running_loop().create_task(self._run())
            elif self._missing(key, last):
                if urgent:
                    await self._wake()
                else:
                    self._wake_later()
            async with asyncio.timeout(block):
                return await reader.got
        except TimeoutError:
            return None
        finally:
            self._drop(key, reader)
            if reader.got.done() and not reader.got.cancelled():
                reader.got.exception()  # a failed read it left before: not "never retrieved"

    def _missing(self, key: str, last: str) -> bool:
        """Whether the XREAD in flight cannot give this reader its entries."""
        if self.reading is None:
            return False  # the next XREAD will name it
        since = self.reading.get(key)
        return since is None or id_key(last) < id_key(since)

    async def _wake(self) -> None:
        """Unblock the XREAD in flight, once, so that it is sent again with the new stream;
        again while Redis says it was not blocking yet and it is still the read in flight."""
        if self.woken or self.hub_id is None:
            return
        self.woken, meant_for = True, self.round
        with contextlib.suppress(redis.RedisError):
            for _ in range(WAKE_TRIES):
                if await self.clients.get("sse").client_unblock(self.hub_id):
                    return
                if self.round != meant_for or self.reading is None:
                    return  # that read is over: the next one names the new stream
                await asyncio.sleep(WAKE_RETRY_S)

    def _wake_later(self) -> None:
        """``_wake`` in ``WAKE_LATER_S``, unless the read in flight has returned by then."""
        meant_for, loop = self.round, asyncio.get_running_loop()

        def due() -> None:
            if self.round == meant_for and self.reading is not None and not self.woken:
                self.waking = loop.create_task(self._wake())

        loop.call_later(WAKE_LATER_S, due)

    def _drop(self, key: str, reader: _Reader) -> None:
        waiting = self.readers.get(key, [])
        if reader in waiting:
            waiting.remove(reader)
        if not waiting:
            self.readers.pop(key, None)

    async def _run(self) -> None:
        """XREAD for every stream with readers, until none is left; each reader gets the
        entries after its own id, or the error of the read. An error that is not Redis's
        (redis-py's pool fails a read whose client was closed under it, at the API's
        shutdown, with a KeyError) ends the task, and its readers get it at once instead of
        waiting out their blocks; the next reader starts a new task."""
        try:
            await self._read_while_wanted()
        except Exception as exc:  # noqa: BLE001 - handed to the readers, who raise it
            self.hub_id = None
            self._fail(exc)

    async def _read_while_wanted(self) -> None:
        hub = self.clients.get("hub")
        while self.readers:
            try:
                if self.hub_id is None:
                    self.hub_id = await hub.client_id()
                # named after the round trip above: a reader that came during it is in
                streams = {
                    k: min((r.last for r in rs), key=id_key) for k, rs in self.readers.items()
                }
                self.reading, self.woken = streams, False
                self.round += 1
                reply = await hub.xread(streams, block=int(HUB_BLOCK_S * 1000), count=HUB_COUNT)
            except redis.RedisError as exc:  # a timeout too: Redis went silent past the block
                self.hub_id = None
                self._fail(exc)
                await asyncio.sleep(0.1)  # the readers retry as Redis comes back
                continue
            finally:
                self.reading = None
            self._hand_out(reply or [])
            await asyncio.sleep(0)  # readers that got entries ask again before the next read

    def _hand_out(self, reply: list) -> None:
        for raw_key, entries in reply:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            for reader in list(self.readers.get(key, [])):
                after = id_key(reader.last)
                mine = [e for e in entries if id_key(e[0].decode()) > after]
                if mine and not reader.got.done():
                    reader.got.set_result([[raw_key, mine]])
                    self._drop(key, reader)

    def _fail(self, exc: Exception) -> None:
        for waiting in list(self.readers.values()):
            for reader in waiting:
                if not reader.got.done():
                    reader.got.set_exception(exc)
        self.readers.clear()
