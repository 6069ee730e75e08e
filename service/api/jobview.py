"""A job as clients see it (``schemas.JobView``), read from RQ's job hash and the result
the worker stored; and ending a job that is still queued."""

from __future__ import annotations

from typing import Any

import redis
from rq.exceptions import DeserializationError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from engine.tasks import TaskName

from .. import store
from ..schemas import JobUrls, JobView
from ..vocabulary import Event, JobStatus
from .errors import no_job

# RQ's statuses that the service reports as one of its own (the others are spelt alike).
RQ_STATUS = {
    "created": JobStatus.QUEUED,
    "scheduled": JobStatus.QUEUED,
    "deferred": JobStatus.QUEUED,
    "rate_limited": JobStatus.QUEUED,
    "ready_to_enqueue": JobStatus.QUEUED,
    "stopped": JobStatus.CANCELED,
}
# Tasks whose results have a picture (GET /jobs/{id}/heatmap.png).
HEATMAP_TASKS = (
    TaskName.IMAGE_CLASSIFICATION,
    TaskName.GENERATION,
    TaskName.TEXT_CLASSIFICATION,
)


def job_urls(job_id: str, task: str) -> JobUrls:
    urls = JobUrls(
        self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events", cancel=f"/jobs/{job_id}"
    )
    if task in HEATMAP_TASKS:
        urls.heatmap = f"/jobs/{job_id}/heatmap.png"
    return urls


def fetch_job(r: redis.Redis, job_id: str) -> Job | None:
    """The RQ job, or None when there is none or its hash is not one that RQ wrote with the
    JSON serializer: what is in Redis is never unpickled, and never a 500."""
    try:
        return Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    except (NoSuchJobError, DeserializationError, ValueError, KeyError):
        return None


def job_view(r: redis.Redis, job_id: str) -> JobView:
    """Status, timings and, when finished, the result (or the error); 404 for no job.

    RQ's status is read first: workers store the result before RQ's status says finished,
    so read in this order a finished job always has its result (the other order let a job
    end between the two reads and look finished without one)."""
    job = fetch_job(r, job_id)
    result = store.get_result(r, job_id)
    if job is None and result is None:
        raise no_job(job_id)
    view: dict[str, Any] = {"job_id": job_id}
    if job is not None:
        status = str(job.get_status(refresh=False).value)
        meta = job.meta or {}
        view.update(
            status=RQ_STATUS.get(status, status),
            model=meta.get("model"),
            task=meta.get("task"),
            enqueued_at=_iso(job.enqueued_at),
            started_at=_iso(job.started_at),
            ended_at=_iso(job.ended_at),
        )
    if result is not None:
        view.update(
            status=result["status"],
            model=result.get("model"),
            task=result.get("task"),
            ended_at=view.get("ended_at") or result.get("ended_at"),
        )
        if result["status"] == JobStatus.FINISHED:
            view.update(result=result, timings=result.get("timings"))
        else:
            view["error"] = result.get("error")
    elif job is not None and view["status"] == JobStatus.FAILED:
        view["error"] = _rq_error(job)
    view["urls"] = job_urls(job_id, view.get("task") or "")
    return JobView.model_validate(view)


NO_WORKER = "no worker is alive: the job waits in the queue until one starts"


def waiting_note(workers: list[dict[str, Any]]) -> str | None:
    """Why a job waits although POST /run_task queued it: no worker is alive, or the live
    ones are still warming (``WorkerStatus``; the one furthest along is named, with its
    model). None when a worker is ready to take jobs."""
    if any(store.is_ready(w) for w in workers):
        return None
    if not workers:
        return NO_WORKER
    w = max((w.get("warming") or {} for w in workers), key=lambda p: p.get("index", 0))
    where = f" (model {w['model']}, {w['index']} of {w['total']})" if "model" in w else ""
    return f"a worker is warming{where}; the job starts when it is ready"


def with_workers(r: redis.Redis, view: JobView) -> JobView:
    """A job not over yet, with how many workers are alive to run it (warming ones too),
    and a note when none takes jobs yet (the job then stays queued: POST /run_task still
    queues, for autoscalers that start workers from zero)."""
    if view.status.terminal:
        return view
    workers = store.live_workers(r)
    view.workers_alive = len(workers)
    view.note = waiting_note(workers)
    return view


def _rq_error(job: Job) -> dict[str, str]:
    """The error of a job that failed in RQ's hands (no result stored): the exception's
    last line."""
    try:
        exc = job.latest_result()
    except (ValueError, KeyError):  # not a result RQ wrote with the JSON serializer
        exc = None
    text = (exc.exc_string or "").strip().splitlines() if exc else []
    return {"type": "WorkerError", "message": text[-1] if text else "failed"}


def cancel_queued(r: redis.Redis, view: JobView, ttl: int) -> bool:
    """Take a queued job out of RQ's queue and store it as canceled; False when it has
    started meanwhile (its worker then sees the cancel flag)."""
    job = fetch_job(r, view.job_id)
    if job is None:
        return False
    try:
        job.cancel()
    except InvalidJobOperation:
        return False
    error = {"type": "JobCanceled", "message": "canceled while queued"}
    doc = {"status": JobStatus.CANCELED, "model": view.model, "task": view.task, "error": error}
    store.finish(r, view.job_id, store.Ending(Event.CANCELED, error, doc), ttl)
    return True


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None
