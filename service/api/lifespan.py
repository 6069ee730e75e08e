"""What runs beside the requests: the reaper loop, which ends the jobs of dead workers even
when no worker is left to do it (``service.reaper``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis
from fastapi import FastAPI

from .. import heap, reaper
from ..config import Settings

log = logging.getLogger("service.api")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(reap_forever(app.state.redis, app.state.settings))
    heap.settle()  # the app, its routes and imports live as long as the process
    yield
    task.cancel()
    if app.state.hub.task is not None:  # the streams' shared read, before its clients close
        app.state.hub.task.cancel()
    await app.state.async_redis.aclose()


async def reap_forever(r: redis.Redis, settings: Settings) -> None:
    """Reap every third of the heartbeat TTL; Redis down is waited out, and any other error
    of a pass is logged: never fatal, since this task is what ends the jobs of dead workers
    when no worker is left (an exception used to end the task for good, silently)."""
    while True:
        try:
            await asyncio.to_thread(
                reaper.reap,
                r,
                settings.queue,
                settings.heartbeat_ttl,
                settings.result_ttl,
                settings.failure_ttl,
            )
        except redis.RedisError:
            pass
        except Exception:  # noqa: BLE001 - logged; the next pass tries again
            log.exception("reaper pass failed")
        await asyncio.sleep(settings.heartbeat_ttl / 3)
