"""The API's endpoints, one router per concern: ``jobs`` (submit, view, cancel, heatmap),
``events`` (a job's Server-Sent Events) and ``meta`` (health, readiness, models, metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import authorize
from ..errors import INVALID, UNAUTHORIZED, UNAVAILABLE
from ..json_body import StrictJSONRoute


def authorized_router(tag: str) -> APIRouter:
    """A router whose every route needs the API key (when keys are configured), with the
    error replies those routes share; a JSON body with a key twice in one object is refused
    (``json_body``)."""
    return APIRouter(
        tags=[tag],
        route_class=StrictJSONRoute,
        dependencies=[Depends(authorize)],
        responses={**UNAUTHORIZED, **INVALID, **UNAVAILABLE},
    )
