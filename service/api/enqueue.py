"""Putting an accepted job on the queue: RQ's job (by dotted path, so this process never
imports the worker's code), its ``queued`` event and its offer to dynamic batching, in one
Redis transaction, which also reads the queue's length: one round trip per accepted job.
A job that made the queue longer than its limit is taken back out (429)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis
from fastapi import HTTPException
from rq import Queue, Retry
from rq.job import Job

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
    comes first). The queue's length is read in the same transaction, after the push: a
    separate LLEN before it was a second round trip for every request, and no more exact
    (other API processes enqueue between the two)."""
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
    pipe.llen(queue.key)
    depth = (await pipe.execute())[-1]
    if depth > settings.max_queue and await _withdraw(ar, queue.key, job_id, group):
        raise HTTPException(429, "queue full, retry later", headers=RETRY_AFTER)


# Take a just-enqueued job back out of the queue, with its RQ hash, its stream and its batch
# offer, unless a worker has taken it meanwhile. KEYS: RQ's queue, the job's hash, its
# stream, its batch group's list (or the queue again). ARGV: the job id.
_WITHDRAW = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('LREM', KEYS[4], 1, ARGV[1])
return 1
"""


async def _withdraw(ar: aredis.Redis, queue_key: str, job_id: str, group: str | None) -> bool:
    """Whether the job was still queued and is now withdrawn (False: a worker runs it, and
    it stays accepted)."""
    batch = batching.BATCH.format(group) if group is not None else queue_key
    keys = [queue_key, Job.key_for(job_id), store.EVENTS.format(job_id), batch]
    return bool(await ar.eval(_WITHDRAW, len(keys), *keys, job_id))
