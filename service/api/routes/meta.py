"""The service itself: liveness, readiness, the registry's models and the metrics. Only
/models needs an API key (probes and Prometheus scrape without one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ... import __version__, load_failures, store
from ...reaper import STUCK
from ...schemas import Health, ModelInfo, ModelList, ModelStatus, Readiness
from ..deps import MetricsDep, RedisDep, RegistryDep, authorize
from ..errors import UNAUTHORIZED, UNAVAILABLE

router = APIRouter(tags=["service"])
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def probe(path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """A GET route that also answers HEAD (Kubernetes' and load balancers' probes send it;
    FastAPI's routes answer only the methods they list: 405): the same handler, whose body
    the server leaves out. HEAD stays out of /docs, where it would repeat GET."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.get(path, **options)(endpoint)
        router.head(path, include_in_schema=False, **options)(endpoint)
        return endpoint

    return register


@router.get(
    "/models",
    response_model=ModelList,
    dependencies=[Depends(authorize)],
    responses={**UNAUTHORIZED, **UNAVAILABLE},
)
def models(r: RedisDep, registry: RegistryDep) -> ModelList:
    """The registry, which models a worker that takes jobs holds warm, and which a worker
    could not load (``load_error``: which file and why, as the worker reported it)."""
    warm: dict[str, int] = {}
    for w in filter(store.is_ready, store.live_workers(r)):
        for mid in w.get("models", []):
            warm[mid] = warm.get(mid, 0) + 1
    failures = load_failures.read(r, list(registry.models))
    return ModelList(
        models=[
            ModelInfo(
                id=s.id,
                task=s.task,
                description=s.description,
                expects=s.expects,
                labels=s.labels,
                limits=s.limits,
                warm=warm.get(s.id, 0) > 0,
                workers_warm=warm.get(s.id, 0),
                status=_status(warm.get(s.id, 0), s.id in failures),
                load_error=failures.get(s.id),
            )
            for s in registry.models.values()
        ]
    )


def _status(workers_warm: int, failed: bool) -> ModelStatus:
    """A model held warm serves jobs whatever another worker reported of it."""
    if workers_warm:
        return "warm"
    return "failed" if failed else "cold"


@probe("/healthz", response_model=Health)
def healthz() -> Health:
    """Alive: answers without Redis."""
    return Health(status="ok", version=__version__)


@probe(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_unset=True,
    responses={503: {"model": Readiness, "description": "not ready"}},
)
def readyz(r: RedisDep, response: Response) -> Readiness:
    """Ready when Redis answers and at least one worker takes jobs (its heartbeat is live
    and says ``ready``); a worker still warming its models, and one stuck in a job past
    its timeout (its heartbeat thread beats on), are counted apart."""
    try:
        r.ping()
        workers = store.live_workers(r)
        stuck = stuck_workers(r, workers)
    except redis.RedisError as exc:
        response.status_code = 503
        return Readiness(ready=False, redis=False, error=str(exc))
    warming = sum(not store.is_ready(w) for w in workers)
    ready = len(workers) - warming - len(stuck)
    if not ready:
        response.status_code = 503
    extra = {"stuck": len(stuck)} if stuck else {}  # the field only when there are some
    return Readiness(ready=ready > 0, redis=True, workers=ready, warming=warming, **extra)


def stuck_workers(r: redis.Redis, workers: list[dict]) -> set[str]:
    """The names of these ready workers that the reaper marked stuck."""
    names = [str(w.get("name")) for w in workers if store.is_ready(w)]
    marks = r.mget([STUCK.format(n) for n in names]) if names else []
    return {n for n, m in zip(names, marks, strict=True) if m}


@probe(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
