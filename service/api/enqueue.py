"""Putting an accepted job on the queue: RQ's job (by dotted path, so this process never
imports the worker's code), its ``queued`` event and its offer to dynamic batching, in one
Redis transaction."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis
from fastapi import HTTPException
from rq import Queue, Retry

from engine.tasks import TaskName

from .. import batching, store
from ..config import Settings
from ..vocabulary import Event
from .errors import RETRY_AFTER

JOB_FUNC = "service.jobs.run_job"


async def enqueue(
    ar: aredis.Redis,
    queue: Queue,
    settings: Settings,
    job_id: str,
    body: dict[str, Any],
    model: str,
    task: TaskName,
) -> None:
    """Enqueue the validated request ``body`` as job ``job_id`` (429 when the queue is full).

    Given a pipeline, RQ builds the job and only queues commands on it, so the async client's
    pipeline takes the whole enqueue in one awaited round trip (RQ starts the MULTI, so it
    comes first)."""
    if await ar.llen(queue.key) >= settings.max_queue:
        raise HTTPException(429, "queue full, retry later", headers=RETRY_AFTER)
    stream_ttl = settings.job_timeout * (settings.retries + 1) + settings.result_ttl
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
        description=f"{model} {task}",
        meta={"model": model, "task": task},
        pipeline=pipe,
    )
    store.add_event(
        pipe,
        job_id,
        Event.QUEUED,
        {"model": model, "task": task},
        stream_ttl,
        settings.stream_maxlen,
    )
    group = batching.group_key(body)
    if group is not None:
        batching.announce(pipe, group, job_id, settings.result_ttl)
    await pipe.execute()
