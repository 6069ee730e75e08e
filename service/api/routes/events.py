"""GET /jobs/{id}/events: the job's Server-Sent Events (``service.api.sse``)."""

from __future__ import annotations

from fastapi import HTTPException, Request, Response

from ..deps import JobId, StreamsDep
from ..errors import NO_JOB
from ..sse import EventStreamResponse, is_stream_id
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
        **NO_JOB,
    },
)
async def job_events(job_id: JobId, request: Request, streams: StreamsDep) -> EventStreamResponse:
    """Server-Sent Events from the job's Redis stream. Event ids are stream ids, so a
    client reconnecting with Last-Event-ID (header, or ``last_event_id`` in the query)
    resumes without gaps or duplicates."""
    if not await streams.exists(job_id):
        raise HTTPException(404, f"no job {job_id!r} (unknown or expired)")
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    return streams.response(job_id, last if last and is_stream_id(last) else "0-0")
