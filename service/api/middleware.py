"""ASGI middleware, one pass over each request: (1) bodies over the limit get 413, counting
the bytes actually streamed, not only Content-Length, and compressed bodies 415; (2) request
counts and durations by route template (never the raw path, which would put job ids in
labels)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.routing import Match, Mount

from .metrics import ApiMetrics


class BodyLimitAndMetrics:
    def __init__(self, app: Any, limit: int, metrics: ApiMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics
        # Each (route, method, status)'s counter and (route, method)'s histogram, as
        # ``labels`` gives them: looked up here instead of by ``labels`` on every request
        # (its checks, string conversions and lock: 2.8 -> 1.0 us a request in-process).
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, root_path = [500], scope.get("root_path", "")

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                encoding = content_encoding(scope)
                if encoding is not None:
                    status[0] = 415
                    why = f"Content-Encoding {encoding} is not supported: send the body as is"
                    return await JSONResponse({"detail": why}, 415)(scope, receive, send)
                body = await self._read_limited(scope, receive)
                if body is None:
                    status[0] = 413
                    resp = JSONResponse({"detail": f"body over {self.limit} bytes"}, 413)
                    return await resp(scope, receive, send)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapped)
        finally:
            count, duration = self._children(
                route_label(scope, root_path), scope["method"], status[0]
            )
            count.inc()
            duration.observe(time.perf_counter() - t0)

    def _children(self, label: str, method: str, status: int) -> tuple[Any, Any]:
        key = (label, method, status)
        if key not in self.children:
            self.children[key] = (
                self.metrics.requests.labels(label, method, str(status)),
                self.metrics.duration.labels(label, method),
            )
        return self.children[key]

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


def content_encoding(scope: dict) -> str | None:
    """The request's Content-Encoding when it is one the API does not decode (any but
    ``identity``): a gzipped JSON body was read as JSON and refused as "not UTF-8 (byte
    0x8b ...)", which names the wrong problem; the body limit counts the bytes sent, not
    what they would inflate to, so the API takes no compressed bodies."""
    for name, value in scope.get("headers", []):
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return value.decode("latin-1")
    return None


def route_label(scope: dict, root_path: str) -> str:
    """The matched route's template. FastAPI records only its own routes as the scope's
    route: the others (a mount's files, /openapi.json, the docs pages) are matched again
    here, against the request as it came (``root_path`` before a mount changed it); a
    mount's files count as the mount's ``/{path}``."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    probe = {**scope, "root_path": root_path}
    for candidate in getattr(scope.get("app"), "routes", ()):
        if candidate.matches(probe)[0] == Match.FULL:
            suffix = "/{path}" if isinstance(candidate, Mount) else ""
            return getattr(candidate, "path", "unmatched") + suffix
    return "unmatched"


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then the client's messages."""
    sent = [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
