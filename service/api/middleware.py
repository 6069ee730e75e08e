"""ASGI middleware, one pass over each request: (1) bodies over the limit get 413, counting
the bytes actually streamed, not only Content-Length; (2) request counts and durations by
route template (never the raw path, which would put job ids in labels)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse

from .metrics import ApiMetrics


class BodyLimitAndMetrics:
    def __init__(self, app: Any, limit: int, metrics: ApiMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_limited(scope, receive)
                if body is None:
                    status[0] = 413
                    resp = JSONResponse({"detail": f"body over {self.limit} bytes"}, 413)
                    return await resp(scope, receive, send)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status[0])).inc()
            self.metrics.duration.labels(label, scope["method"]).observe(time.perf_counter() - t0)

    async def _read_limited(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None once it is over the limit."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then the client's messages."""
    sent = [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
