"""The HTTP front end. It validates requests against the registry, enqueues jobs by dotted
path (``service.jobs.run_job``) and reads status, results and event streams from Redis.

This process never imports torch: everything it needs (RQ, redis, numpy, Pillow) is light,
so an API replica starts in a second and scales apart from the GPU workers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from rq import Queue, Retry
from rq.exceptions import DeserializationError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from . import __version__, batching, codec, heatmap, reaper, store, web
from .config import Settings
from .registry import ModelSpec, Registry, load_registry
from .schemas import RunTaskRequest

JOB_FUNC = "service.jobs.run_job"
HTTP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
RQ_STATUS = {"scheduled": "queued", "deferred": "queued", "stopped": "canceled"}
log = logging.getLogger("service.api")
RETRY_AFTER = {"Retry-After": "5"}
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
# RQ's own rule for job ids; anything else cannot name a job (422, never a 500 from RQ).
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="a repeat of a request with the same key (and body) gets the same job",
    ),
]
# How long an open SSE stream waits for Redis to come back before it ends (the client then
# reconnects with Last-Event-ID); browsers' EventSource gives up on a 503, so streams wait.
SSE_REDIS_OUTAGE_S = 60.0
# Events of one Redis read are sent together up to this many characters (the events are
# ASCII JSON: bytes); a larger event goes alone, so a stalled reader still holds at most one
# batch of events in the API.
SSE_CHUNK_BYTES = 16 << 10


def _invalid(loc: list[str | int], msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own, with a one-line message that names the field."""
    field = ".".join(str(p) for p in loc)
    return HTTPException(
        422,
        detail=[
            {"loc": ["body", *loc], "msg": msg, "type": "value_error", "message": f"{field}: {msg}"}
        ],
    )


class ApiMetrics:
    """The API's metrics in their own registry; queue depth and live workers are read from
    Redis when Prometheus scrapes, so they are never stale."""

    def __init__(self, r: redis.Redis, queue: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "backtrace_http_requests_total",
            "HTTP requests",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "backtrace_http_request_duration_seconds",
            "HTTP request time",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.sse_clients = Gauge(
            "backtrace_sse_clients", "Connected SSE clients", registry=self.registry
        )
        self.r, self.queue = r, queue
        self.registry.register(self)

    def collect(self):  # called by prometheus_client at scrape time
        depth = GaugeMetricFamily(
            "backtrace_queue_depth", "Jobs waiting in the queue", labels=["queue"]
        )
        live = GaugeMetricFamily("backtrace_workers_live", "Workers with a live heartbeat")
        try:
            depth.add_metric([self.queue], self.r.llen(f"rq:queue:{self.queue}"))
            live.add_metric([], len(store.live_workers(self.r)))
        except redis.RedisError:
            pass  # Redis down: export nothing rather than fail the scrape
        yield depth
        yield live

    def describe(self):
        return []


class BodyLimitAndMetrics:
    """ASGI middleware: (1) bodies over the limit get 413, counting the bytes actually
    streamed, not only Content-Length; (2) request counts and durations by route template
    (never the raw path, which would put job ids in labels)."""

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
    sent = [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry: Registry = load_registry(settings.registry_path)
    r = store.connect(settings.redis_url)
    queue = Queue(
        settings.queue,
        connection=r,
        serializer=JSONSerializer,
        default_timeout=settings.job_timeout,
    )
    metrics = ApiMetrics(r, settings.queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_reap_forever(r, settings))
        yield
        task.cancel()

    app = FastAPI(
        title="backtrace",
        version=__version__,
        description="Layer-wise relevance for registry models, as jobs with streamed traces.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitAndMetrics, limit=settings.max_body_bytes, metrics=metrics)
    pools: dict[str, aredis.Redis] = {}

    def aredis_client(pool: str = "sse") -> aredis.Redis:
        """An async client, made on first use (inside the event loop). POST /run_task
        enqueues on a pool of its own ("enqueue"), apart from the SSE readers' blocking
        XREADs: sharing one, tests/chaos saw the events endpoint fail with "Connection closed
        by server" after a Redis restart (cause not isolated)."""
        if pool not in pools:
            pools[pool] = aredis.Redis.from_url(settings.redis_url)
        return pools[pool]

    async def authorize(request: Request) -> None:
        """Only when keys are configured; compared in constant time, against every key (no
        early exit that would tell which key a guess came close to). Async because it never
        blocks: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
        request for a string comparison."""
        if not settings.api_keys:
            return
        given = _presented_key(request).encode()
        ok = False
        for k in settings.api_keys:
            ok |= hmac.compare_digest(given, k.encode())
        if not ok:
            raise HTTPException(
                401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        """Redis down or restarting is a temporary condition of this service, not a bug."""
        log.warning("503 for %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": f"queue unavailable, retry later ({type(exc).__name__})"},
            503,
            headers=RETRY_AFTER,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            loc = [str(p) for p in e["loc"]]
            errors.append(
                {
                    "loc": loc,
                    "msg": e["msg"],
                    "type": e["type"],
                    "message": f"{'.'.join(loc[1:] or loc)}: {e['msg']}",
                }
            )
        return JSONResponse({"detail": errors}, 422)

    def urls(job_id: str, task: str) -> dict[str, str]:
        u = {
            "self": f"/jobs/{job_id}",
            "events": f"/jobs/{job_id}/events",
            "cancel": f"/jobs/{job_id}",
        }
        if task in ("image-classification", "generation", "text-classification"):
            u["heatmap"] = f"/jobs/{job_id}/heatmap.png"
        return u

    @app.post(
        "/run_task",
        status_code=202,
        dependencies=[Depends(authorize)],
        responses={200: {"description": "the job's events, when asked for with Accept: "
                         "text/event-stream", "content": {"text/event-stream": {}}}},
    )  # fmt: skip
    async def run_task(
        req: RunTaskRequest,
        request: Request,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Validate against the registry and enqueue; 202 with the job id and its URLs.
        With an Idempotency-Key header, a repeat of the same request gets the same job.

        With ``Accept: text/event-stream`` the answer is instead the job's event stream, as
        ``GET /jobs/{id}/events`` sends it (200; the job id in ``X-Job-Id`` and
        ``Location``): one request instead of two, for fetch-based clients. A reconnect
        resumes through the events URL with Last-Event-ID.

        Async, with no thread: run in the thread pool, a POST waited for the GIL behind the
        event loop's SSE work after each Redis round trip (bench.service: overhead p50
        about 24 ms that way, 18 ms this way). Given a pipeline, RQ builds the job and only
        queues commands on it, so the async client's pipeline takes the whole enqueue in one
        awaited round trip."""
        spec = registry.get(req.model)
        if spec is None:
            raise HTTPException(404, f"model {req.model!r} is not in the registry (GET /models)")
        task = spec.task if req.task == "auto" else req.task
        if task != spec.task:
            raise _invalid(["task"], f"model {spec.id} does {spec.task}, not {task}")
        _check_inputs(spec, req)
        job_id = uuid.uuid4().hex
        body = req.model_dump(mode="json")
        body["task"] = task
        accepted = {
            "job_id": job_id,
            "status": "queued",
            "model": spec.id,
            "task": task,
            "urls": urls(job_id, task),
        }
        wants_stream = "text/event-stream" in request.headers.get("accept", "")
        idem = _idempotency_key(request, idempotency_key, body)
        ar = aredis_client("enqueue")
        if idem is not None:
            first = {"fingerprint": idem[1], "response": accepted}
            if not await ar.set(idem[0], json.dumps(first), nx=True, ex=settings.result_ttl):
                replayed = _replayed(await ar.get(idem[0]), idem[1])
                return answer(replayed, wants_stream, {"Idempotent-Replayed": "true"})
        try:
            if await ar.llen(queue.key) >= settings.max_queue:
                raise HTTPException(429, "queue full, retry later", headers=RETRY_AFTER)
            stream_ttl = settings.job_timeout * (settings.retries + 1) + settings.result_ttl
            # One transaction: the job, its queued event and its offer to batching (RQ
            # starts the MULTI, so it comes first)
            pipe = ar.pipeline()
            queue.enqueue_call(
                JOB_FUNC,
                kwargs={"request": body},
                job_id=job_id,
                timeout=settings.job_timeout,
                result_ttl=settings.result_ttl,
                failure_ttl=settings.failure_ttl,
                ttl=settings.result_ttl,
                retry=Retry(max=settings.retries) if settings.retries else None,
                description=f"{spec.id} {task}",
                meta={"model": spec.id, "task": task},
                pipeline=pipe,
            )
            store.add_event(
                pipe,
                job_id,
                "queued",
                {"model": spec.id, "task": task},
                stream_ttl,
                settings.stream_maxlen,
            )
            group = batching.group_key(body)
            if group is not None:
                batching.announce(pipe, group, job_id, settings.result_ttl)
            await pipe.execute()
        except BaseException:
            if idem is not None:  # not accepted: a retry with the same key may try again
                with contextlib.suppress(redis.RedisError):
                    await ar.delete(idem[0])
            raise
        return answer(accepted, wants_stream, {})

    def answer(accepted: dict[str, Any], wants_stream: bool, headers: dict[str, str]) -> Response:
        """POST /run_task's answer for an accepted job: 202 with the job, or its events."""
        job_id = accepted["job_id"]
        headers = {"Location": f"/jobs/{job_id}", **headers}
        if wants_stream:
            return stream(job_id, **{"X-Job-Id": job_id, **headers})
        return JSONResponse(accepted, 202, headers=headers)

    def job_view(job_id: str) -> dict[str, Any]:
        # RQ's status first: workers store the result before RQ's status says finished, so
        # read in this order a finished job always has its result (the other order let a
        # job end between the two reads and look finished without one).
        job = _fetch_job(r, job_id)
        result = store.get_result(r, job_id)
        if job is None and result is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown or expired)")
        view: dict[str, Any] = {"job_id": job_id}
        if job is not None:
            status = job.get_status(refresh=False)
            status = RQ_STATUS.get(str(status.value), str(status.value))
            meta = job.meta or {}
            view.update(
                {
                    "status": status,
                    "model": meta.get("model"),
                    "task": meta.get("task"),
                    "enqueued_at": _iso(job.enqueued_at),
                    "started_at": _iso(job.started_at),
                    "ended_at": _iso(job.ended_at),
                }
            )
        if result is not None:
            view.update(
                {
                    "status": result["status"],
                    "model": result.get("model"),
                    "task": result.get("task"),
                    "ended_at": view.get("ended_at") or result.get("ended_at"),
                }
            )
            if result["status"] == "finished":
                view["result"] = result
                view["timings"] = result.get("timings")
            else:
                view["error"] = result.get("error")
        elif job is not None and view["status"] == "failed":
            try:
                exc = job.latest_result()
            except (ValueError, KeyError):  # not a result RQ wrote with the JSON serializer
                exc = None
            text = (exc.exc_string or "").strip().splitlines() if exc else []
            view["error"] = {"type": "WorkerError", "message": text[-1] if text else "failed"}
        view["urls"] = urls(job_id, view.get("task") or "")
        return view

    @app.get("/jobs/{job_id}", dependencies=[Depends(authorize)])
    def get_job(job_id: JobId) -> dict[str, Any]:
        """Status, timings and, when finished, the result (or the error)."""
        return job_view(job_id)

    @app.delete("/jobs/{job_id}", dependencies=[Depends(authorize)])
    def cancel_job(job_id: JobId) -> JSONResponse:
        """Cancel a queued job at once, or ask the worker running it to stop at its next
        checkpoint (every generated token; between phases otherwise)."""
        view = job_view(job_id)
        if view["status"] in ("finished", "failed", "canceled"):
            raise HTTPException(409, f"job {job_id} already {view['status']}")
        store.request_cancel(r, job_id, settings.result_ttl)
        if view["status"] == "queued":
            job = _fetch_job(r, job_id)
            try:
                if job is not None:
                    job.cancel()
            except InvalidJobOperation:  # started meanwhile: the worker sees the flag
                job = None
            if job is not None:
                error = {"type": "JobCanceled", "message": "canceled while queued"}
                doc = {
                    "status": "canceled",
                    "model": view.get("model"),
                    "task": view.get("task"),
                    "error": error,
                }
                store.finish(r, job_id, doc, "canceled", error, settings.result_ttl)
                return JSONResponse({"job_id": job_id, "status": "canceled"}, 200)
        return JSONResponse({"job_id": job_id, "status": "canceling"}, 202)

    def stream(job_id: str, last: str = "0-0", **headers: str) -> StreamingResponse:
        return EventStreamResponse(
            _sse(aredis_client(), job_id, last, settings.keepalive_s, metrics),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )

    @app.get("/jobs/{job_id}/events", dependencies=[Depends(authorize)])
    async def job_events(job_id: JobId, request: Request) -> StreamingResponse:
        """Server-Sent Events from the job's Redis stream. Event ids are stream ids, so a
        client reconnecting with Last-Event-ID resumes without gaps or duplicates."""
        ar = aredis_client()
        key = store.EVENTS.format(job_id)
        if not await ar.exists(key) and not await ar.exists(f"rq:job:{job_id}"):
            raise HTTPException(404, f"no job {job_id!r} (unknown or expired)")
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        return stream(job_id, last if last and _is_stream_id(last) else "0-0")

    @app.get("/jobs/{job_id}/heatmap.png", dependencies=[Depends(authorize)])
    def job_heatmap(job_id: JobId) -> Response:
        """The relevance as a PNG: an overlay for images, token-by-step cells for generation,
        one row per text for text classification."""
        result = store.get_result(r, job_id)
        if result is None or result.get("status") != "finished":
            raise HTTPException(404, "no heatmap: the job has not finished")
        return Response(_render(result), media_type="image/png")

    @app.get("/models", dependencies=[Depends(authorize)])
    def models() -> dict[str, Any]:
        """The registry, and which models a live worker holds warm."""
        warm: dict[str, int] = {}
        for w in store.live_workers(r):
            for mid in w.get("models", []):
                warm[mid] = warm.get(mid, 0) + 1
        return {
            "models": [
                {
                    "id": s.id,
                    "task": s.task,
                    "description": s.description,
                    "labels": s.labels,
                    "limits": s.limits.model_dump(),
                    "warm": warm.get(s.id, 0) > 0,
                    "workers_warm": warm.get(s.id, 0),
                }
                for s in registry.models.values()
            ]
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready when Redis answers and at least one worker's heartbeat is live."""
        try:
            r.ping()
            workers = store.live_workers(r)
        except redis.RedisError as exc:
            return JSONResponse({"ready": False, "redis": False, "error": str(exc)}, 503)
        ok = len(workers) > 0
        return JSONResponse(
            {"ready": ok, "redis": True, "workers": len(workers)}, 200 if ok else 503
        )

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    web.mount(app)
    return app


class _Last(str):
    """The last chunk of an event stream (``EventStreamResponse`` ends the response with it)."""


class EventStreamResponse(StreamingResponse):
    """A ``StreamingResponse`` that sends its last chunk (a ``_Last``) together with the end
    of the response: one socket write, and one wake-up of the client, less per stream."""

    async def stream_response(self, send: Any) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                last = isinstance(chunk, _Last)
                body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
                await send({"type": "http.response.body", "body": body, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:  # also when a send fails or is cancelled: the generator's cleanup runs now
            await self.body_iterator.aclose()


async def _sse(ar: aredis.Redis, job_id: str, last: str, keepalive: float, metrics: ApiMetrics):
    """The job's events from ``last`` on. The events of one Redis read go out in chunks of up
    to ``SSE_CHUNK_BYTES`` (each send is a socket write that wakes the client; a job's
    ``queued`` and ``started`` usually share one). Nothing is read from Redis before the
    client has taken what was sent (the server's send waits while the socket is full), so a
    slow reader costs one batch of memory; a client that goes away cancels this generator."""
    key = store.EVENTS.format(job_id)
    metrics.sse_clients.inc()
    down_since = None
    pending = "retry: 2000\n\n"  # sent with the first events
    try:
        while True:
            try:
                resp = await ar.xread({key: last}, block=max(1, int(keepalive * 1000)), count=100)
                if not resp:
                    await _close_dead_job(ar, job_id, key, last)
            except redis.RedisError as exc:  # Redis restarting: wait for it, bounded
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > SSE_REDIS_OUTAGE_S:
                    return
                yield pending + f": redis unavailable ({type(exc).__name__}), retrying\n\n"
                pending = ""
                await asyncio.sleep(min(1.0, keepalive))
                continue
            down_since = None
            if not resp:
                yield pending + ": keep-alive\n\n"
                pending = ""
                continue
            for entry_id, fields in resp[0][1]:
                last = entry_id.decode()
                try:
                    event, data = fields[b"event"].decode(), fields[b"data"].decode()
                except (KeyError, UnicodeDecodeError):
                    continue  # not an entry the service wrote
                entry = f"id: {last}\nevent: {event}\ndata: {data}\n\n"
                if pending and len(pending) + len(entry) > SSE_CHUNK_BYTES:
                    yield pending
                    pending = ""
                pending += entry
                if event in store.TERMINAL_EVENTS:
                    yield _Last(pending)
                    return
            if pending:
                yield pending
                pending = ""
    finally:  # also when the client went away (cancelled): stop counting it
        metrics.sse_clients.dec()


async def _close_dead_job(ar: aredis.Redis, job_id: str, key: str, last: str) -> None:
    """A worker that died (or timed out in RQ's hands) writes no terminal event: when RQ says
    the job is over and the stream has none, write one so streams always end."""
    status = await ar.hget(f"rq:job:{job_id}", "status")
    status = status.decode() if status else "expired"
    if status not in ("failed", "stopped", "canceled", "finished", "expired"):
        return
    rest = await ar.xrange(key, min=f"({last}" if last != "0-0" else "-", max="+")
    if any(f.get(b"event", b"").decode(errors="replace") in store.TERMINAL_EVENTS for _, f in rest):
        return
    error = {"type": "WorkerLost", "message": f"job ended without a result (rq status {status})"}
    await ar.xadd(key, {"event": "error", "data": json.dumps(error)})


def _fetch_job(r: redis.Redis, job_id: str) -> Job | None:
    """The RQ job, or None when there is none or its hash is not one that RQ wrote with the
    JSON serializer: what is in Redis is never unpickled, and never a 500."""
    try:
        return Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    except (NoSuchJobError, DeserializationError, ValueError, KeyError):
        return None


async def _reap_forever(r: redis.Redis, settings: Settings) -> None:
    """End the jobs of dead workers even when no worker is left to do it (service.reaper)."""
    while True:
        with contextlib.suppress(redis.RedisError):
            await asyncio.to_thread(
                reaper.reap,
                r,
                settings.queue,
                settings.heartbeat_ttl,
                settings.result_ttl,
                settings.failure_ttl,
            )
        await asyncio.sleep(settings.heartbeat_ttl / 3)


def _presented_key(request: Request) -> str:
    """The API key a request carries: ``Authorization: Bearer`` or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return request.headers.get("x-api-key", "")


def _idempotency_key(
    request: Request, given: str | None, body: dict[str, Any]
) -> tuple[str, str] | None:
    """The Redis key for the request's Idempotency-Key (scoped to the caller's API key, so
    that callers cannot see each other's jobs) and a fingerprint of the body; None without
    the header."""
    if given is None:
        return None
    scope = hashlib.sha256(f"{_presented_key(request)}\0{given}".encode()).hexdigest()
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return store.IDEMPOTENCY.format(scope), fingerprint


def _replayed(raw: bytes | None, fingerprint: str) -> dict[str, Any]:
    """The first request's accepted job again, or 422 when the key came with another body."""
    if raw is None:  # the first request failed and released the key just now
        raise HTTPException(409, "a request with this Idempotency-Key is being retried")
    first = json.loads(raw)
    if first["fingerprint"] != fingerprint:
        raise HTTPException(422, "Idempotency-Key was used with a different request body")
    return first["response"]


def _is_stream_id(s: str) -> bool:
    a, _, b = s.partition("-")
    return a.isdigit() and (b.isdigit() or b == "")


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None


# The named references (engine.references) that make sense for each task's inputs.
REFERENCES = {
    "text-classification": ("zeros", "mask"),
    "generation": ("zeros",),
    "image-classification": ("zeros", "mean", "blur"),
    "tabular-classification": ("zeros",),
}


def _check_inputs(spec: ModelSpec, req: RunTaskRequest) -> None:
    """Bounds that depend on the model: input kind, batch, sizes, generation limits."""
    kind, lim, inputs = req.inputs.kind(), spec.limits, req.inputs
    allowed = {
        "text-classification": ("text", "token_ids"),
        "generation": ("text", "token_ids"),
        "image-classification": ("image",),
        "tabular-classification": ("features",),
    }[spec.task]
    if kind not in allowed:
        raise _invalid(["inputs", kind], f"{spec.task} takes {' or '.join(allowed)}")
    value = getattr(inputs, kind)
    rows = value if isinstance(value, list) and value and isinstance(value[0], list) else None
    if kind == "text" and isinstance(value, list):
        rows = value
    if rows is not None and len(rows) > lim.max_batch:
        raise _invalid(["inputs", kind], f"{len(rows)} rows, more than max_batch={lim.max_batch}")
    if kind == "token_ids":
        longest = max(len(x) for x in rows) if rows else len(value)
        if longest > lim.max_tokens:
            raise _invalid(
                ["inputs", "token_ids"], f"{longest} tokens, more than max_tokens={lim.max_tokens}"
            )
    if kind == "text":
        longest = max(len(t) for t in (rows or [value]))
        if longest > lim.max_tokens * 32:  # cheap bound; the worker counts real tokens
            raise _invalid(["inputs", "text"], f"text too long for max_tokens={lim.max_tokens}")
    if kind == "features":
        width = max(len(x) for x in rows) if rows else len(value)
        if width > lim.max_features:
            raise _invalid(
                ["inputs", "features"],
                f"{width} features, more than max_features={lim.max_features}",
            )
    if kind == "image":
        _check_image(value, lim.max_image_size)
    reference = req.relevance.reference
    if reference not in (None, *REFERENCES[spec.task]):
        choices = ", ".join(REFERENCES[spec.task])
        raise _invalid(
            ["relevance", "reference"], f"{spec.task} takes reference {choices}, not {reference}"
        )
    if spec.task == "generation":
        g = req.generation
        if g.max_new_tokens is None:
            g.max_new_tokens = min(16, lim.max_new_tokens)
        if g.max_new_tokens > lim.max_new_tokens:
            raise _invalid(
                ["generation", "max_new_tokens"],
                f"{g.max_new_tokens} is more than {lim.max_new_tokens} for {spec.id}",
            )
        if g.num_beams > lim.max_beams:
            raise _invalid(
                ["generation", "num_beams"],
                f"{g.num_beams} is more than {lim.max_beams} for {spec.id}",
            )


def _check_image(b64: str, max_side: int) -> None:
    """Decode the header only (no full decode in the API) and bound the size."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(b64.split(",", 1)[-1], validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            fmt, (w, h) = img.format, img.size
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise _invalid(["inputs", "image"], f"not a base64 PNG or JPEG image ({exc})") from exc
    if fmt not in ("PNG", "JPEG"):
        raise _invalid(["inputs", "image"], f"format {fmt} is not PNG or JPEG")
    if max(w, h) > max_side:
        raise _invalid(["inputs", "image"], f"{w}x{h} is larger than {max_side} pixels a side")


def _render(result: dict[str, Any]) -> bytes:
    if "generation" in result:
        g = result["generation"]
        rows = [codec.decode(t)[0] for t in g.get("relevance_trace", [])]
        if not rows:
            raise HTTPException(404, "no heatmap: this job has no relevance trace")
        cols = list(g["prompt_tokens"][0]) + list(g["new_tokens"][0])
        return heatmap.token_grid(rows, cols, [str(t) for t in g["new_tokens"][0]])
    items = result.get("inputs", [])
    if "image_png_b64" in result and items and "relevance_map" in items[0]:
        return heatmap.image_overlay(
            result["image_png_b64"], codec.decode(items[0]["relevance_map"])
        )
    if items and "tokens" in items[0] and "relevance" in items[0]:
        rows = [codec.decode(it["relevance"]) for it in items]
        labels = [p["label"] for p in result.get("predictions", [])]
        return heatmap.token_grid(rows, [str(t) for t in items[0]["tokens"] or []], labels)
    arrays = [
        np.atleast_1d(codec.decode(it["relevance"])).reshape(-1)
        for it in items
        if "relevance" in it
    ]
    if not arrays:
        raise HTTPException(404, "no heatmap for this result")
    return heatmap.token_grid(arrays, [], [])
