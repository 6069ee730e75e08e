"""uvicorn's server as ``python -m service serve`` runs the API: at shutdown (SIGTERM from a
rolling update or a scale-down) it first ends the open event streams (``sse.Draining``), so
that it exits within seconds and each client reconnects, with Last-Event-ID, to another API
process; the jobs themselves go on in the workers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from .one_write import OneWriteProtocol

# The longest uvicorn waits for other requests in flight at shutdown (a POST in its enqueue,
# a heatmap being drawn) before it cancels them: under Kubernetes' default grace period of
# 30 s, after which the process is killed whatever it is doing.
GRACEFUL_SHUTDOWN_S = 20
# How long open streams get to send the endings ``before_drain`` wrote before they are drained.
ENDINGS_S = 2.0


class Server(uvicorn.Server):
    """A uvicorn server that tells the app's open event streams to end when it shuts down.
    ``before_drain`` (``serve --all-in-one``: stop the workers, end the jobs that will not
    run) runs first, in a thread, while the streams still serve what it writes."""

    def __init__(self, app: FastAPI, before_drain: Callable[[], None] | None = None, **config: Any):
        super().__init__(
            uvicorn.Config(
                app,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                http=OneWriteProtocol,
                **config,
            )
        )
        self.app, self.before_drain = app, before_drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.before_drain is not None:
            await asyncio.to_thread(self.before_drain)
            streams, until = self.app.state.draining.streams, time.monotonic() + ENDINGS_S
            while streams and time.monotonic() < until:
                await asyncio.sleep(0.05)
        self.app.state.draining.begin()
        await super().shutdown(sockets)
