"""The HTTP front end, as a package: ``app`` wires it (settings, lifespan, middleware, routers,
exception handlers); ``deps`` reads what the routes need from ``app.state``; ``routes`` holds
the endpoints (``jobs``: submit, view, cancel, heatmap; ``events``: the SSE stream; ``meta``:
health, readiness, models, metrics). Requests are validated against the registry
(``validation``) and enqueued by dotted path (``service.jobs.run_job``, ``enqueue``); status,
results and event streams are read from Redis (``jobview``, ``sse``).

This process never imports torch: everything it needs (RQ, redis, numpy, Pillow) is light,
so an API replica starts in a second and scales apart from the GPU workers."""

from .app import create_app

__all__ = ["create_app"]
