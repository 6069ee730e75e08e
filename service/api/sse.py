"""Server-Sent Events from a job's Redis stream. Event ids are stream ids, so a client
reconnecting with Last-Event-ID resumes without gaps or duplicates; a stream ends with the
job's terminal event (``done``, ``error`` or ``canceled``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi.responses import StreamingResponse
from rq.job import JobStatus as RqStatus

from .. import store
from ..vocabulary import LIFECYCLE_EVENTS, TERMINAL_EVENTS, Event
from .first_events import FirstEvents
from .hub import StreamHub, id_key
from .jobview import waiting_note
from .metrics import ApiMetrics

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
# How long an open SSE stream waits for Redis to come back before it ends (the client then
# reconnects with Last-Event-ID); browsers' EventSource gives up on a 503, so streams wait.
SSE_REDIS_OUTAGE_S = 60.0
# The socket timeout of the streams' shared blocking read (``hub``) is its block time plus
# this, and that of the readers' other commands this alone: a blocking read that Redis
# answers empty means quiet streams, and only a socket silent for longer than the block
# asked for is a Redis that stopped answering (redis-py's default, 5 s, was shorter than the
# streams' 15 s blocks and turned every quiet stream into a reported outage).
SSE_SOCKET_MARGIN_S = 10.0
KEEPALIVE = ": keep-alive\n\n"
# How long the ending written for a job that ended without one (``_close_dead_job``) is kept:
# a result's default lifetime, for clients that reconnect.
DEAD_JOB_TTL_S = 3600
UNREADABLE_ENDING = json.dumps(
    {"type": "UnreadableResult", "message": "the job's ending in Redis is not the service's"}
)
# Events of one Redis read are sent together up to this many characters (the events are
# ASCII JSON: bytes); a larger event goes alone, so a stalled reader still holds at most one
# batch of events in the API.
SSE_CHUNK_BYTES = 16 << 10
# How long events that do not end a job are held back to go out with those that follow
# (``_events``): short enough not to be seen, long enough for a small model's whole job.
SSE_HOLD_S = 0.025
# RQ's statuses of a job that is over ("expired": RQ's hash is gone).
RQ_ENDED = frozenset(
    (RqStatus.FAILED, RqStatus.STOPPED, RqStatus.CANCELED, RqStatus.FINISHED, "expired")
)


# What an open stream gets when its API process shuts down: the job goes on, and the client
# reconnects (EventSource does so by itself) with Last-Event-ID to another API process.
DRAIN_NOTE = b": the server is shutting down; reconnect with Last-Event-ID to resume\n\n"


class _Last(str):
    """The last chunk of an event stream (``EventStreamResponse`` ends the response with it)."""


class Draining:
    """The API process's open event streams, ended when it shuts down (``begin``). uvicorn
    waits for open responses to end before it exits, and a job's stream ends only with the
    job: an API process with a stream open on a queued job never exited, until its
    orchestrator killed it and every stream was cut without a word."""

    def __init__(self) -> None:
        self.started = False
        self.streams: set[asyncio.Task] = set()

    def begin(self) -> None:
        """End every open stream (each sends ``DRAIN_NOTE``), and any that opens later."""
        self.started = True
        for task in self.streams:
            task.cancel()


class EventStreamResponse(StreamingResponse):
    """A ``StreamingResponse`` that sends its last chunk (a ``_Last``) together with the end
    of the response: one socket write, and one wake-up of the client, less per stream.
    With ``headers_with_first``, the status line and headers wait for the first chunk (for
    a stream whose first events are known: they follow within ``SSE_HOLD_S``), so that the
    two writes leave back to back and wake the client once."""

    def __init__(
        self, *args: Any, draining: Draining, headers_with_first: bool = False, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.draining, self.headers_with_first = draining, headers_with_first
        self.started = False  # the status line and headers are sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The stream, cancelled when the client goes away, even while the job is quiet and
        nothing is being sent. Starlette's own watch (for ASGI before 2.4, which uvicorn
        speaks) is an anyio task group per response: 85 us of a short job's 270 us stream.
        This one is a task that waits for ``http.disconnect`` and cancels the stream's.
        When the API process shuts down (``Draining``) the stream is cancelled too, and
        ends with ``DRAIN_NOTE``."""
        stream, gone = asyncio.current_task(), asyncio.Event()
        if self.draining.started:
            return await self._drained(send)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            stream.cancel()  # type: ignore[union-attr]

        watcher = asyncio.get_running_loop().create_task(watch())
        self.draining.streams.add(stream)  # type: ignore[arg-type]
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not (gone.is_set() or self.draining.started):
                raise
            stream.uncancel()  # type: ignore[union-attr]  # ours: the client or the server
            if not gone.is_set():
                with contextlib.suppress(OSError):
                    await self._drained(send)
            return
        except OSError:  # the client went away during a write
            return
        finally:
            watcher.cancel()
            self.draining.streams.discard(stream)  # type: ignore[arg-type]
        if self.background is not None:
            await self.background()

    async def _drained(self, send: Any) -> None:
        """End the response with ``DRAIN_NOTE``: the server is shutting down."""
        if not self.started:
            await send(self._start())
        await send({"type": "http.response.body", "body": DRAIN_NOTE, "more_body": False})

    def _start(self) -> dict[str, Any]:
        self.started = True
        return {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }

    async def stream_response(self, send: Any) -> None:
        if not self.headers_with_first:
            await send(self._start())
        try:
            async for chunk in self.body_iterator:
                if not self.started:
                    await send(self._start())
                last = isinstance(chunk, _Last)
                body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
                await send({"type": "http.response.body", "body": body, "more_body": not last})
                if last:
                    return
            if not self.started:
                await send(self._start())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:  # also when a send fails or is cancelled: the generator's cleanup runs now
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EventStreams:
    """What a job's event stream needs: the SSE readers' Redis client, the keep-alive
    interval, the metrics (which count connected clients), the process's open streams, its
    shared read and the first events of the jobs it has just accepted."""

    redis: aredis.Redis
    keepalive: float
    metrics: ApiMetrics
    draining: Draining
    hub: StreamHub
    first_events: FirstEvents

    async def exists(self, job_id: str) -> bool:
        """Whether there is a job (or its events) to stream."""
        if await self.redis.exists(store.EVENTS.format(job_id)):
            return True
        return bool(await self.redis.exists(f"rq:job:{job_id}"))

    async def peek(self, job_id: str, last: str) -> Any:
        """The job's events after ``last`` that are there now (a read that does not block):
        events mean the job exists, so the usual request (the job's ``queued`` is written
        when it is accepted) needs no EXISTS round trip before its stream starts."""
        return await self.redis.xread({store.EVENTS.format(job_id): last}, count=100)

    def response(
        self, job_id: str, last: str = "0-0", first: Any = None, **headers: str
    ) -> EventStreamResponse:
        """The job's events after stream id ``last``, as a response (``first``: a read of
        them already made, by ``peek``)."""
        return EventStreamResponse(
            _events(self, job_id, last, first),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
            draining=self.draining,
            headers_with_first=bool(first),
        )


async def _events(
    streams: EventStreams, job_id: str, last: str, first: Any = None
) -> AsyncIterator[str]:
    """The job's events from ``last`` on. Lifecycle events (``queued``, ``started``) are held
    back for up to ``SSE_HOLD_S`` after the first of them, and go out together with what
    follows them meanwhile: a short job's ``queued``, ``started`` and ``done`` reach the
    client in one socket write (one wake-up of the client) instead of three. A terminal
    event is never held, nor is progress (tokens, relevance: they go out with what is
    held as they come), and the hold ends on time however fast events arrive. The events
    of one read go out in chunks of up to ``SSE_CHUNK_BYTES``. Nothing is read from Redis
    before the client has taken what was sent (the server's send waits while the socket is
    full), so a slow reader costs one batch of memory; a client that goes away cancels this
    generator."""
    ar, keepalive = streams.redis, streams.keepalive
    streams.metrics.sse_clients.inc()
    down_since, hold_until, holding = None, None, True
    pending = "retry: 2000\n\n"  # sent with the first events
    try:
        while True:
            held = hold_until is not None
            block = max(0.001, hold_until - time.monotonic()) if held else keepalive
            try:
                resp, first = first or await _read(streams, job_id, last, block, held), None
                quiet = "" if resp or held else await _quiet_note(ar)
            except redis.RedisError as exc:  # Redis restarting: wait for it, bounded
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > SSE_REDIS_OUTAGE_S:
                    yield _Last(pending + ": redis unavailable too long; reconnect\n\n")
                    return
                yield pending + f": redis unavailable ({type(exc).__name__}), retrying\n\n"
                pending, hold_until, holding = "", None, True
                await asyncio.sleep(min(1.0, keepalive))
                continue
            down_since = None
            if not resp:  # the hold is over, or the job was quiet: a keep-alive
                yield pending + quiet
                pending, hold_until, holding = "", None, True
                continue
            for entry_id, fields in resp[0][1]:
                last = entry_id.decode()
                event, data = _decoded(fields)
                if event is None:
                    continue  # not an entry the service wrote
                entry = f"id: {last}\nevent: {event}\ndata: {data}\n\n"
                if pending and len(pending) + len(entry) > SSE_CHUNK_BYTES:
                    yield pending
                    pending = ""
                pending += entry
                if event in TERMINAL_EVENTS:
                    yield _Last(pending)
                    return
                holding = holding and event in LIFECYCLE_EVENTS
            hold_until = hold_until or time.monotonic() + SSE_HOLD_S
            if not holding or time.monotonic() >= hold_until:  # progress, or the hold is up
                if pending:
                    yield pending
                pending, hold_until, holding = "", None, True
    finally:  # also when the client went away (cancelled): stop counting it
        streams.metrics.sse_clients.dec()


def _decoded(fields: dict[bytes, bytes]) -> tuple[str | None, str]:
    """An entry's event and data; no event for an entry the service did not write. An ending
    whose data is not text (not the service's JSON) still ends the stream, as an ``error``
    that says so: the first ending stands, so nothing could be written after it."""
    try:
        return fields[b"event"].decode(), fields[b"data"].decode()
    except (KeyError, UnicodeDecodeError):
        if fields.get(b"event", b"").decode(errors="replace") not in TERMINAL_EVENTS:
            return None, ""
    return Event.ERROR, UNREADABLE_ENDING


async def _read(streams: EventStreams, job_id: str, last: str, block: float, held: bool) -> Any:
    """The job's entries after ``last``, waiting up to ``block`` seconds (in the process's
    shared read: ``StreamHub``); empty when nothing came (a keep-alive, not an outage). A
    quiet job that RQ says is over gets its terminal event here (not checked at the end of
    a hold, which is no sign of a quiet job)."""
    key = store.EVENTS.format(job_id)
    resp = await streams.hub.read(key, last, block, urgent=not held)  # held: they can wait
    if not resp and not held:
        await _close_dead_job(streams.redis, job_id, key, last)
    return resp


async def _quiet_note(ar: aredis.Redis) -> str:
    """The comment a quiet stream sends: a keep-alive while a worker takes jobs, else why
    the job waits (``jobview.waiting_note``: no worker is alive, or one is warming)."""
    cursor, keys = 0, []
    while True:
        cursor, found = await ar.scan(cursor, match=store.WORKER.format("*"), count=1000)
        keys += found
        if not cursor:
            break
    workers = store.decode_workers(await ar.mget(keys)) if keys else []
    note = waiting_note(workers)
    return KEEPALIVE if note is None else f": {note}\n\n"


async def _close_dead_job(ar: aredis.Redis, job_id: str, key: str, last: str) -> None:
    """A worker that died (or timed out in RQ's hands) writes no terminal event: when RQ says
    the job is over and the stream has none, write one so streams always end."""
    status = await ar.hget(f"rq:job:{job_id}", "status")
    status = status.decode() if status else "expired"
    if status not in RQ_ENDED:
        return
    rest = await ar.xrange(key, min=f"({last}" if last != "0-0" else "-", max="+")
    if any(f.get(b"event", b"").decode(errors="replace") in TERMINAL_EVENTS for _, f in rest):
        return
    message = f"job ended without a result (rq status {status})"
    if status == "expired":
        message = "the job is no longer in Redis (expired, or Redis lost its data)"
    # As a worker writes an ending: never after another ending, and with an expiry (a stream
    # made here for a job whose keys are all gone would otherwise stay for good).
    pipe = ar.pipeline(transaction=False)
    error = {"type": "WorkerLost", "message": message}
    store.add_event(pipe, job_id, Event.ERROR, error, DEAD_JOB_TTL_S)
    await pipe.execute()


def is_stream_id(s: str) -> bool:
    """Whether ``s`` can be a Redis stream id (``123`` or ``123-4``, each part ASCII digits
    below 2**64, at most ``ID_LENGTH`` characters): a Last-Event-ID that is not one starts
    the stream from the beginning. Redis refuses the others ("²", which ``str.isdigit``
    takes, 2**64, "1-" with no sequence, 128 zeros), and its refusal of the stream's first
    read was a 503 that EventSource retried for good; a part of more than 4300 digits,
    which Python refuses to read as a number, was a 500."""
    if len(s) > ID_LENGTH:
        return False
    a, dash, b = s.partition("-")
    parts = (a, b) if dash else (a,)
    return all(p.isascii() and p.isdigit() and int(p) < 1 << 64 for p in parts)


ID_LENGTH = 127  # the most characters of a stream id Redis reads (its parser's buffer)


# What ``resume_error`` says of a Last-Event-ID that is the job's ending: nothing follows it.
ENDED = "ended"


async def resume_error(ar: aredis.Redis, job_id: str, last: str) -> str | None:
    """Why ``last`` cannot resume the job's stream, or None when it can; ``ENDED`` when
    ``last`` is the job's ending. An id after the stream's last entry would block until an
    event newer than it, which the job never writes: the stream would hang instead of
    ending. So would the ending's own id, which is what a client that reconnects right
    after the ending sends (EventSource reconnects by itself whenever a stream closes)."""
    if last == "0-0":
        return None
    newest = await ar.xrevrange(store.EVENTS.format(job_id), count=1)
    if not newest:
        return f"Last-Event-ID {last}: the job has no events yet; reconnect without it"
    top, fields = newest[0][0].decode(), newest[0][1]
    if id_key(last) > id_key(top):
        return f"Last-Event-ID {last} is after the job's last event {top}; use an id it sent"
    if id_key(last) == id_key(top) and _decoded(fields)[0] in TERMINAL_EVENTS:
        return ENDED
    return None
