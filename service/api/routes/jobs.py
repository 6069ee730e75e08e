"""Jobs: POST /run_task validates against the registry and enqueues; GET /jobs/{id} reads
status and result; DELETE /jobs/{id} cancels; GET /jobs/{id}/heatmap.png draws the relevance."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Header, HTTPException, Request, Response

from ... import store
from ...schemas import CancelReply, ErrorBody, JobAccepted, JobView, RunTaskRequest
from ...vocabulary import JobStatus
from .. import door, validation
from ..deps import JobId, RedisDep, SettingsDep, submission
from ..enqueue import enqueue
from ..errors import NO_JOB, no_job
from ..idempotency import IdempotentRequest
from ..jobview import RQ_STATUS, cancel_queued, fetch_job, job_urls, job_view, with_workers
from ..render import heatmap_png
from ..sse import EventStreams
from . import authorized_router

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="a repeat of a request with the same key (and body) gets the same job",
    ),
]

router = authorized_router("jobs")


@router.post(
    "/run_task",
    status_code=202,
    response_model=JobAccepted,
    response_model_exclude_unset=True,
    responses={
        200: {
            "description": "the job's events, when asked for with Accept: text/event-stream",
            "content": {"text/event-stream": {}},
        },
        404: {"model": ErrorBody, "description": "the model is not in the registry"},
        409: {"model": ErrorBody, "description": "this Idempotency-Key is being retried"},
        413: {"model": ErrorBody, "description": "body too large"},
        415: {"model": ErrorBody, "description": "compressed body (Content-Encoding)"},
        429: {"model": ErrorBody, "description": "queue full; retry later"},
    },
)
# Async, with no thread: run in the thread pool, a POST waited for the GIL behind the event
# loop's SSE work after each Redis round trip (bench.service: overhead p50 about 24 ms that
# way, 18 ms this way).
async def run_task(
    req: RunTaskRequest,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Validate against the registry and enqueue; 202 with the job id and its URLs.
    With an Idempotency-Key header, a repeat of the same request gets the same job.

    With ``Accept: text/event-stream`` the answer is instead the job's event stream, as
    ``GET /jobs/{id}/events`` sends it (200; the job id in ``X-Job-Id`` and
    ``Location``): one request instead of two, for fetch-based clients. A reconnect
    resumes through the events URL with Last-Event-ID.

    Everything the model cannot take is a 422 here, naming the field, the value and what
    is allowed: an input kind or size, a class (``relevance.target``) or token id it does
    not have, a prompt longer than it takes, blank text, generation settings for a
    classifier, steps past ``max_new_tokens``, a layer its graph does not have (once a
    worker has captured it)."""
    api = submission(request)
    spec, task = validation.resolve(api.registry, req)
    validation.check_inputs(spec, req)
    door.check(spec, task, req, await api.metadata.complete(api.redis, spec))
    await door.check_layers(api.redis, spec, req, api.metadata)
    job_id = uuid.uuid4().hex
    body = req.model_dump(mode="json")
    body["task"] = task.value
    accepted = JobAccepted(
        job_id=job_id,
        status=JobStatus.QUEUED,
        model=spec.id,
        task=task,
        urls=job_urls(job_id, task),
    )
    wants_stream = "text/event-stream" in request.headers.get("accept", "")
    idem = IdempotentRequest.of(request, idempotency_key, body)
    if idem is not None:
        doc = accepted.model_dump(mode="json", exclude_unset=True)
        first = await idem.claim(api.redis, doc, api.settings.result_ttl)
        if first is not None:
            replayed = JobAccepted.model_validate(first)
            return _answer(replayed, wants_stream, api.streams, replayed=True)
    try:
        queued = await enqueue(api.redis, api.queue, api.settings, job_id, body, spec.id, task)
    except BaseException:
        if idem is not None:  # not accepted: a retry with the same key may try again
            await idem.release(api.redis)
        raise
    if not wants_stream:  # for the client's GET of its events, most often next
        api.streams.first_events.add(job_id, queued)
    return _answer(accepted, wants_stream, api.streams, replayed=False)


def _answer(
    accepted: JobAccepted, wants_stream: bool, streams: EventStreams, replayed: bool
) -> Response:
    """POST /run_task's answer for an accepted job: 202 with the job, or its events."""
    job_id = accepted.job_id
    headers = {"Location": f"/jobs/{job_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wants_stream:
        return streams.response(job_id, **{"X-Job-Id": job_id, **headers})
    # The model is ours and valid by construction: its JSON as a response, without FastAPI
    # validating and serialising it again through ``response_model`` on every request.
    body = accepted.model_dump_json(exclude_unset=True)
    return Response(body, 202, headers, media_type="application/json")


@router.get(
    "/jobs/{job_id}",
    response_model=JobView,
    response_model_exclude_unset=True,
    responses=NO_JOB,
)
def get_job(job_id: JobId, r: RedisDep) -> JobView:
    """Status, timings and, when finished, the result (or the error). A job not over yet
    says how many workers are alive (``workers_alive``), with a ``note`` when none is."""
    return with_workers(r, job_view(r, job_id))


@router.delete(
    "/jobs/{job_id}",
    status_code=202,
    response_model=CancelReply,
    responses={
        200: {"model": CancelReply, "description": "canceled while queued"},
        **NO_JOB,
        409: {"model": ErrorBody, "description": "the job has already ended"},
    },
)
def cancel_job(
    job_id: JobId, r: RedisDep, settings: SettingsDep, response: Response
) -> CancelReply:
    """Cancel a queued job at once (200), or ask the worker running it to stop at its next
    checkpoint (202; every generated token, between phases otherwise)."""
    view = job_view(r, job_id)
    if view.status.terminal:
        raise HTTPException(409, f"job {job_id} already {view.status}")
    store.request_cancel(r, job_id, settings.result_ttl)
    if view.status == JobStatus.QUEUED and cancel_queued(r, view, settings.result_ttl):
        response.status_code = 200
        return CancelReply(job_id=job_id, status=JobStatus.CANCELED)
    return CancelReply(job_id=job_id, status="canceling")


# Why a job has no heatmap yet, or never will, by its status.
_NOT_FINISHED = {
    JobStatus.QUEUED: "the job is queued, not finished",
    JobStatus.STARTED: "the job is running, not finished",
    JobStatus.FAILED: "the job failed: GET /jobs/{job_id} says why",
    JobStatus.CANCELED: "the job was canceled",
}


@router.get(
    "/jobs/{job_id}/heatmap.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the heatmap"},
        404: {
            "model": ErrorBody,
            "description": "no such job, or it has not finished, or has no heatmap",
        },
    },
)
def job_heatmap(job_id: JobId, r: RedisDep) -> Response:
    """The relevance as a PNG: an overlay for images, token-by-step cells for generation,
    one row per text for text classification."""
    result = store.get_result(r, job_id)
    job = fetch_job(r, job_id) if result is None else None
    if result is None and job is None:
        raise no_job(job_id)
    status = result["status"] if result is not None else job.get_status(refresh=False).value
    status = RQ_STATUS.get(status, status)
    if status != JobStatus.FINISHED:
        why = _NOT_FINISHED.get(status, "the job has not finished")
        raise HTTPException(404, f"no heatmap: {why.format(job_id=job_id)}")
    try:
        png = heatmap_png(result)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    return Response(png, media_type="image/png")
