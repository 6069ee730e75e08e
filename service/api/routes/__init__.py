"""The API's endpoints, one router per concern: ``jobs`` (submit, view, cancel, heatmap),
``events`` (a job's Server-Sent Events) and ``meta`` (health, readiness, models, metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import authorize
from ..errors import INVALID, UNAUTHORIZED, UNAVAILABLE
from ..json_body import StrictJSONRoute


def authorized_router(tag: str) -> APIRouter:
    """A router whose every route needs the API key when keys are configured (``create_app``
    includes it with ``AUTHORIZED``), with the error replies those routes share; a JSON body
    with a key twice in one object is refused (``json_body``)."""
    return APIRouter(
        tags=[tag],
        route_class=StrictJSONRoute,
        responses={**UNAUTHORIZED, **INVALID, **UNAVAILABLE},
    )


# The dependency of every route of an ``authorized_router``, given when the app is made and
# only where keys are configured: FastAPI solves a dependency on each request (its cache
# key, a coroutine, its bookkeeping: about 10 us of CPU), and without keys it checks nothing.
AUTHORIZED = [Depends(authorize)]
