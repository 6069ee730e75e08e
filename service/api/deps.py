"""The routes' dependencies, as ``Annotated`` types read from ``app.state`` (made once by
``create_app``), and the API-key check.

Every dependency is ``async`` though none awaits: FastAPI runs a plain ``def`` dependency in
its thread pool, a thread hop per request for an attribute read."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import hiredis
import redis
import redis.asyncio as aredis
from fastapi import Depends, HTTPException, Path, Request
from rq import Queue

from .. import store
from ..config import Settings
from ..registry import Registry
from .metadata import ModelMetadata
from .metrics import ApiMetrics
from .sse import EventStreams


class _CPackedConnection(aredis.Connection):
    """redis-py's asyncio connection with commands packed by hiredis' C packer, as its
    blocking connection already does: the asyncio one packs each argument in Python (the
    enqueue script's 56 arguments took about 12 us of a POST's CPU that way); and sent
    without a task per write (``send_packed_command``)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]  # "CONFIG GET" (or b"CONFIG GET"): two arguments, as redis-py splits
        if isinstance(name, str | bytes) and (" " if isinstance(name, str) else b" ") in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a bytearray (hiredis takes bytes and memoryviews), or worse
            pass
        # Converted only after hiredis refused them: converting every argument first was a
        # loop over the enqueue script's 56 arguments on every POST (about 10 us of CPU).
        args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # as redis-py reports an argument it cannot encode
            raise redis.DataError(str(exc)) from exc

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """As redis-py sends a command, less its ``asyncio.wait_for`` around a write that the
        socket takes at once (nearly every one): on Python 3.11 that runs the write as a task
        of its own, 10-15 us of a round trip's 50-90 us of CPU. A write the socket does not
        take whole is waited for redis-py's way, under the socket timeout; a connection to
        open or check, and a write that raises, go redis-py's way too (its errors, its
        disconnect). A send that fails inside the transport (a connection lost) raises
        nothing here: it ends at the reply, as a ConnectionError that disconnects too."""
        if self.is_connected and not (check_health and self.health_check_interval):
            transport = self._writer.transport
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            if not transport.get_write_buffer_size():
                try:
                    self._writer.writelines(command)
                except (OSError, RuntimeError):  # nothing sent: redis-py's write reports it
                    pass
                else:
                    if not transport.get_write_buffer_size():
                        return
                    command = []  # queued in the transport: wait for it as redis-py does
        await super().send_packed_command(command, check_health)


class AsyncClients:
    """Async Redis clients by purpose, each made on first use (inside the event loop). POST
    /run_task enqueues on a client of its own ("enqueue"), apart from the SSE readers'
    ("sse"; the streams' shared blocking XREAD has a connection of its own, "hub"): sharing
    one, tests/chaos saw the events endpoint fail with "Connection closed by server" after a
    Redis restart (cause not isolated). ``options`` are a purpose's client settings (the
    readers' socket timeouts)."""

    def __init__(self, url: str, options: dict[str, dict[str, Any]] | None = None):
        self.url = url
        self.options = options or {}
        self.clients: dict[str, aredis.Redis] = {}

    def get(self, purpose: str) -> aredis.Redis:
        if purpose not in self.clients:
            kw = {**store.tcp_options(self.url), **self.options.get(purpose, {})}
            client = aredis.Redis.from_url(self.url, **kw)
            pool = client.connection_pool
            if pool.connection_class is aredis.Connection:  # TCP; TLS and sockets as they are
                pool.connection_class = _CPackedConnection
            self.clients[purpose] = client
        return self.clients[purpose]

    async def aclose(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(redis.RedisError):
                await client.aclose()


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def _metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def event_streams(request: Request) -> EventStreams:
    """What a job's event stream needs, from the app's state. Called by the routes, not
    declared as a dependency, as ``submission`` is."""
    state = request.app.state
    sse = state.async_redis.get("sse")
    settings, metrics, draining = state.settings, state.metrics, state.draining
    return EventStreams(sse, settings.keepalive_s, metrics, draining, state.hub, state.first_events)


@dataclass(frozen=True)
class Submission:
    """What POST /run_task uses, in one read (``submission``): FastAPI solves each dependency
    of each request on its own (a coroutine, its cache key, its bookkeeping), and the route
    had six."""

    settings: Settings
    registry: Registry
    metadata: ModelMetadata
    queue: Queue
    redis: aredis.Redis  # the enqueue client
    streams: EventStreams


def submission(request: Request) -> Submission:
    """What POST /run_task uses, from the app's state: called by the route, not declared as a
    dependency, since FastAPI solving even one dependency costs a request about 10 us of CPU
    (a toy route in-process: 83 -> 73 us without it) for what is an attribute read."""
    state = request.app.state
    return Submission(
        state.settings,
        state.registry,
        state.metadata,
        state.queue,
        state.async_redis.get("enqueue"),
        event_streams(request),
    )


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
RedisDep = Annotated[redis.Redis, Depends(_redis)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
# RQ's own rule for job ids; anything else cannot name a job (422, never a 500 from RQ).
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$")]


def presented_key(request: Request) -> str:
    """The API key a request carries: ``Authorization: Bearer`` or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return request.headers.get("x-api-key", "")


async def authorize(request: Request) -> None:
    """Only when keys are configured; compared in constant time, against every key (no early
    exit that would tell which key a guess came close to). Settings from the app's state,
    not a dependency of its own: this runs on every request."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    given = presented_key(request).encode()
    ok = False
    for k in settings.api_keys:
        ok |= hmac.compare_digest(given, k.encode())
    if not ok:
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
