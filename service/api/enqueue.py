"""Putting an accepted job on the queue: RQ's job (by dotted path, so this process never
imports the worker's code), its ``queued`` event and its offer to dynamic batching, written
by one script that also reads the queue's length: one command and one round trip per
accepted job. A job that made the queue longer than its limit is taken back out (429)."""

from __future__ import annotations

import zlib
from typing import Any

import redis.asyncio as aredis
from fastapi import HTTPException
from rq import Queue, Retry
from rq.job import Job
from rq.utils import now, utcformat

from engine.tasks import TaskName

from .. import batching, store
from ..config import Settings
from ..vocabulary import Event
from .errors import RETRY_AFTER
from .first_events import Entry

JOB_FUNC = "service.jobs.run_job"
# The job's data is compressed, as RQ writes it, only past this many bytes: RQ reads data
# that is not compressed as it is (``Job.restore``), and compressing a small request (a
# digit's PNG) took about a tenth of a POST's CPU in our code for a few dozen bytes saved.
COMPRESS_ABOVE = 8 << 10

# What RQ's ``Queue.enqueue_call`` writes for a job without dependencies (the queue in RQ's
# set of queues, the job's hash with its expiry, its id on the queue), then the job's first
# event and its batch offer (``service.batching``); it returns the queue's length after the
# push and the event's stream id.
# RQ on a transaction pipeline took fifteen commands (MULTI, EXEC, expiries of dependency
# keys that a job without dependencies never has), each packed and each reply parsed in
# this process. KEYS: the job's hash, RQ's queue, RQ's set of queues, the job's stream, its
# batch group's list (optional). ARGV: the job id, the job's TTL, the stream's TTL, the
# stream's MAXLEN, the event's name and data, then the hash's fields and values.
_ENQUEUE = """
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
  'event', ARGV[5], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if KEYS[5] then
  redis.call('RPUSH', KEYS[5], ARGV[1])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
return {redis.call('LLEN', KEYS[2]), id}
"""

# Take a just-enqueued job back out of the queue, with its RQ hash, its stream and its batch
# offer, unless a worker has taken it meanwhile. KEYS: RQ's queue, the job's hash, its
# stream, its batch group's list (or the queue again). ARGV: the job id.
_WITHDRAW = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('LREM', KEYS[4], 1, ARGV[1])
return 1
"""


async def enqueue(
    ar: aredis.Redis,
    queue: Queue,
    settings: Settings,
    job_id: str,
    body: dict[str, Any],
    model: str,
    task: TaskName,
) -> Entry:
    """Enqueue the validated request ``body`` as job ``job_id`` (429 when the queue is full);
    returns the job's first event (``queued``), as its stream holds it.

    ``job_fields`` gives the job's hash, as ``Queue.enqueue_call`` would store it;
    ``_ENQUEUE`` writes it. The queue's length is read by the same script, after the push:
    a separate LLEN before it was a second round trip for every request, and no more exact
    (other API processes enqueue between the two)."""
    stream_ttl = settings.job_timeout * (settings.retries + 1) + settings.result_ttl
    group = batching.group_key(body)
    keys = [Job.key_for(job_id), queue.key, queue.redis_queues_keys, store.EVENTS.format(job_id)]
    if group is not None:
        keys.append(batching.BATCH.format(group))
    event = store.dumps({"model": model, "task": task})  # as store.add_event writes data
    args = [job_id, settings.result_ttl, stream_ttl, settings.stream_maxlen, Event.QUEUED, event]
    fields = job_fields(queue, settings, body, model, task)
    args += [x for field_value in fields.items() for x in field_value]
    depth, entry_id = await ar.eval(_ENQUEUE, len(keys), *keys, *args)
    if depth > settings.max_queue and await _withdraw(ar, queue.key, job_id, group):
        raise HTTPException(429, "queue full, retry later", headers=RETRY_AFTER)
    return entry_id, {b"event": Event.QUEUED.encode(), b"data": event}


# RQ's hash of a job, by the queue's name and the settings that shape it (``_template``).
_TEMPLATES: dict[tuple, dict[str, Any]] = {}


def job_fields(
    queue: Queue, settings: Settings, body: dict[str, Any], model: str, task: TaskName
) -> dict[str, Any]:
    """The fields of RQ's hash for a job of ``body``: those RQ's ``Job.to_dict`` gives every
    job of these settings, from a job RQ built once (``_template``), and those of this job
    (what it runs, its description and meta, its timestamps) as RQ reads them back.
    RQ building and serialising a ``Job`` per request (``create_job``, ``to_dict``: timeouts
    parsed four times, its serializer checked against a runtime Protocol) took 88 us of a
    POST's CPU in-process. Here the JSON is ``store.dumps``' (RQ's JSON serializer reads it
    with ``json.loads``), the data compressed only past ``COMPRESS_ABOVE``, and the job created
    and enqueued in the same instant (tests/service/test_enqueue_fields.py: RQ reads the
    same job from it)."""
    s = settings
    key = (queue.name, s.job_timeout, s.result_ttl, s.failure_ttl, s.retries)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _template(queue, settings)
    fields = dict(_TEMPLATES[key])  # the template's order: the fields below keep their places
    stamp = utcformat(now())
    fields["created_at"] = stamp
    data = store.dumps((JOB_FUNC, None, (), {"request": body}))  # (func, instance, args, kwargs)
    fields["data"] = zlib.compress(data) if len(data) > COMPRESS_ABOVE else data
    fields["description"] = f"{model} {task}"
    fields["enqueued_at"] = stamp
    fields["meta"] = store.dumps({"model": model, "task": task})
    return fields


def _template(queue: Queue, settings: Settings) -> dict[str, Any]:
    """``Job.to_dict`` of a job RQ builds as ``Queue.enqueue_call`` would, for ``settings``
    (its per-job fields are replaced by ``job_fields``)."""
    job = queue.create_job(
        JOB_FUNC,
        kwargs={"request": {}},
        timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        ttl=settings.result_ttl,
        retry=Retry(max=settings.retries) if settings.retries else None,
        description="",
        meta={"model": ""},
    )
    job.origin, job.enqueued_at = queue.name, now()
    return job.to_dict()


async def _withdraw(ar: aredis.Redis, queue_key: str, job_id: str, group: str | None) -> bool:
    """Whether the job was still queued and is now withdrawn (False: a worker runs it, and
    it stays accepted)."""
    batch = batching.BATCH.format(group) if group is not None else queue_key
    keys = [queue_key, Job.key_for(job_id), store.EVENTS.format(job_id), batch]
    return bool(await ar.eval(_WITHDRAW, len(keys), *keys, job_id))
