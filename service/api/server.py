"""uvicorn's server as ``python -m service serve`` runs the API: at shutdown (SIGTERM from a
rolling update or a scale-down) it first ends the open event streams (``sse.Draining``), so
that it exits within seconds and each client reconnects, with Last-Event-ID, to another API
process; the jobs themselves go on in the workers."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

# The longest uvicorn waits for other requests in flight at shutdown (a POST in its enqueue,
# a heatmap being drawn) before it cancels them: under Kubernetes' default grace period of
# 30 s, after which the process is killed whatever it is doing.
GRACEFUL_SHUTDOWN_S = 20


class Server(uvicorn.Server):
    """A uvicorn server that tells the app's open event streams to end when it shuts down."""

    def __init__(self, app: FastAPI, **config: Any):
        super().__init__(
            uvicorn.Config(app, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **config)
        )
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.draining.begin()
        await super().shutdown(sockets)
