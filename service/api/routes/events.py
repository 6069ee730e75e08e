"""GET /jobs/{id}/events: the job's Server-Sent Events (``service.api.sse``)."""

from __future__ import annotations

from fastapi import HTTPException, Request, Response

from ...schemas import ErrorBody
from ..deps import JobId, event_streams
from ..errors import NO_JOB, no_job
from ..sse import ENDED, is_stream_id, resume_error
from . import authorized_router

router = authorized_router("jobs")


@router.get(
    "/jobs/{job_id}/events",
    response_class=Response,
    responses={
        200: {
            "description": "the job's events, up to and including its terminal event",
            "content": {"text/event-stream": {}},
        },
        204: {"description": "Last-Event-ID is the job's ending: nothing follows it"},
        400: {"model": ErrorBody, "description": "Last-Event-ID is after the job's last event"},
        **NO_JOB,
    },
)
async def job_events(job_id: JobId, request: Request) -> Response:
    """Server-Sent Events from the job's Redis stream. Event ids are stream ids, so a
    client reconnecting with Last-Event-ID (header, or ``last_event_id`` in the query)
    resumes without gaps or duplicates; an id after the job's last event is a 400, and the
    id of its ending a 204 (nothing follows it: EventSource stops reconnecting).
    While the job is quiet the stream sends comments: ``: keep-alive``, or ``: no worker is
    alive ...`` while no worker runs. It always ends with ``done``, ``error`` or
    ``canceled``."""
    streams = event_streams(request)  # not a dependency: see deps.submission
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    last = last if last and is_stream_id(last) else "0-0"
    # events there: the job exists, resumes (one this process has just accepted: no read)
    first = streams.first_events.take(job_id) if last == "0-0" else None
    if first is None:
        first = await streams.peek(job_id, last)
    if not first:
        if not await streams.exists(job_id):
            raise no_job(job_id)
        why = await resume_error(streams.redis, job_id, last)
        if why == ENDED:  # the client has had everything: 204 stops EventSource reconnecting
            return Response(status_code=204)
        if why:
            raise HTTPException(400, why)
    return streams.response(job_id, last, first)
