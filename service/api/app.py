"""``create_app``: the wiring, and nothing else. What the routes share (settings, registry,
Redis clients, RQ queue, metrics) is made once here and kept on ``app.state``, where
``service.api.deps`` reads it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from rq import Queue
from rq.serializers import JSONSerializer

from .. import __version__, store, web
from ..config import Settings
from ..registry import load_registry
from . import errors
from .deps import AsyncClients
from .first_events import FirstEvents
from .hub import HUB_BLOCK_S, StreamHub
from .lifespan import lifespan
from .metadata import ModelMetadata
from .metrics import ApiMetrics
from .middleware import BodyLimitAndMetrics
from .routes import AUTHORIZED, events, jobs, meta
from .sse import SSE_SOCKET_MARGIN_S, Draining


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment). Connecting is lazy: the app
    is made without Redis, which is only needed once requests come."""
    settings = settings or Settings()
    r = store.connect(settings.redis_url)
    # /docs and /redoc with Swagger UI's and ReDoc's files from the fastapi-offline package,
    # served here: the docs work without a network.
    app = FastAPIOffline(
        favicon_url="/favicon.ico",
        title="backtrace",
        version=__version__,
        description="Layer-wise relevance for registry models, as jobs with streamed traces.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = load_registry(settings.registry_path)
    app.state.metadata = ModelMetadata(app.state.registry, settings.data_dir)
    app.state.redis = r
    app.state.async_redis = AsyncClients(
        settings.redis_url,
        {
            "sse": {"socket_timeout": SSE_SOCKET_MARGIN_S},
            "hub": {
                "socket_timeout": HUB_BLOCK_S + SSE_SOCKET_MARGIN_S,
                "single_connection_client": True,
            },
        },
    )
    app.state.hub = StreamHub(app.state.async_redis)
    app.state.first_events = FirstEvents()
    app.state.queue = Queue(
        settings.queue,
        connection=r,
        serializer=JSONSerializer,
        default_timeout=settings.job_timeout,
    )
    app.state.metrics = ApiMetrics(r, settings.queue)
    app.state.draining = Draining()  # ended by ``service.api.server.Server`` at shutdown
    app.add_middleware(
        BodyLimitAndMetrics, limit=settings.max_body_bytes, metrics=app.state.metrics
    )
    errors.install(app)
    for router in (jobs.router, events.router):
        app.include_router(router, dependencies=AUTHORIZED if settings.api_keys else None)
    app.include_router(meta.router)
    web.mount(app)
    return app
