"""Dynamic batching: a worker that starts a classification job also takes the jobs still
queued for the same model with the same parameters, and runs them all as one engine batch.

Why: for a small model, most of a job's time is per-job work (RQ's dequeue and bookkeeping,
Redis round trips, one engine call), and under concurrent load jobs wait behind each other
for it. One batch pays that once. The engine gives each row the same relevance as a run of its
own (batch rows do not interact; padding is masked), so batching changes nothing in a result.

How, keeping RQ's queue the one source of truth:

- The API, after enqueueing a batchable job, also appends its id to ``bt:batch:<group>``, where
  the group names the model and every parameter that must agree for rows to share one run
  (in the same script: ``service.api.enqueue``). The list only hints: ids that RQ has already
  handed out are dropped when a claim pops them.
- A worker that starts a job of that group runs ``claim``: an atomic script pops ids from the
  group's list and takes each one out of RQ's queue (``LREM``); only an id still queued is
  claimed, so a job is never run twice, and one canceled or already started is skipped. A
  claimed job is marked started by this worker in its RQ hash, recorded in ``bt:claims`` and
  given its ``started`` event, and the claim returns it with its cancel flag: one round trip
  from the queue to the engine.
- After the batch's results are stored for clients, ``settle`` ends each claimed job in RQ
  (status, registry, expiry) and removes its claim, in the round trip of the worker's next
  claim or wait.
- If the worker dies holding claims, ``requeue_lost`` (run by the reaper) puts those jobs back
  at the front of RQ's queue, not into a batch list: a job that killed its worker then runs
  alone, under RQ's retry accounting. A claimed job whose result is already stored (its
  worker died before settling it) is settled instead, never run again. No torch here."""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp as rq_timestamp
from rq.utils import now as rq_now
from rq.utils import utcformat

from engine.tasks import TASKS

from . import store
from .vocabulary import Event, JobStatus

BATCH = "bt:batch:{}"
CLAIMS = "bt:claims"
log = logging.getLogger("service.batching")


def group_key(request: dict[str, Any]) -> str | None:
    """The batch group of a request, or None when it runs alone: generation (it streams per
    step), relevance of named layers (their shapes need not be batch-first), and a target
    given per row (it belongs to its own rows)."""
    task = request.get("task")
    out, rel = request.get("output") or {}, request.get("relevance") or {}
    if task not in TASKS or not TASKS[task].batchable or out.get("relevance", "inputs") != "inputs":
        return None
    if rel.get("target") is not None and not isinstance(rel["target"], int):
        return None
    agree = {"model": request.get("model"), "task": task, "relevance": rel, "output": out}
    digest = hashlib.sha1(store.dumps(agree, sort_keys=True)).hexdigest()[:16]
    return f"{request.get('model')}:{digest}"


def _after(pipe: Any, command: Callable[[Any], Any]) -> Any:
    """The reply of ``command`` run on ``pipe`` after what ``pipe`` already holds (the
    settling of the last batch: ``settle``), in one round trip."""
    command(pipe)
    return pipe.execute()[-1]


def wait(r: redis.Redis, group: str, timeout: float, pipe: Any = None) -> bool:
    """Block up to ``timeout`` seconds (at least a millisecond: 0 would block for good) until
    the group's list holds an id; whether it does. BLMOVE of the list onto itself, left to
    left: it takes nothing, so a claim still decides which jobs are this worker's. With
    ``pipe``, its commands go first in the same round trip."""
    key = BATCH.format(group)
    pipe = pipe if pipe is not None else r.pipeline(transaction=False)
    moved = _after(pipe, lambda p: p.blmove(key, key, max(0.001, timeout), "LEFT", "LEFT"))
    return moved is not None


@dataclass(frozen=True)
class Start:
    """What a claim writes for each job it takes: the ``started`` event's stream TTL and
    MAXLEN, and the worker's retry limit (the attempt number is 1 + retries - retries_left,
    as ``Work.attempt`` counts it)."""

    ttl: int
    maxlen: int
    retries: int


# KEYS: the group's list, RQ's queue, the claims hash, the worker's fence (``store.fence``:
# a worker the reaper took for dead claims nothing, as its writes are refused). ARGV: how
# many to claim, the worker, started_at as RQ writes it, RQ's job key prefix, the claim's
# deadline (unix seconds), the events' key prefix, the cancel flags' key prefix, the
# stream's TTL and MAXLEN, the retry limit, the started event's name. Job hashes, streams
# and flags are addressed by id inside the script (as RQ's own keys are: one Redis, not a
# cluster). A claimed job is marked started in RQ, gets its ``started`` event (data as
# ``service.work.run`` writes it for the jobs RQ hands out: worker and attempt), and comes
# back as its id, whether a cancel was asked, and the fields of its hash the worker reads
# (``CLAIMED_FIELDS``): the claim is the batch's only round trip before the engine runs. An
# id whose hash is gone (expired) leaves the queue and is not claimed.
_CLAIM = """
local claimed, n = {}, 0
if redis.call('EXISTS', KEYS[4]) == 1 then return claimed end
while n < tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local job = ARGV[4] .. id
  if redis.call('LREM', KEYS[2], 1, id) == 1 and redis.call('EXISTS', job) == 1 then
    redis.call('HSET', job, 'status', 'started', 'worker_name', ARGV[2], 'started_at', ARGV[3])
    redis.call('HSET', KEYS[3], id, ARGV[2] .. '|' .. ARGV[5])
    local left, attempt = tonumber(redis.call('HGET', job, 'retries_left')), 1
    if left then attempt = 1 + math.max(0, tonumber(ARGV[10]) - left) end
    local data = cjson.encode({worker = ARGV[2], attempt = attempt})
    local stream = ARGV[6] .. id
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[9], '*', 'event', ARGV[11], 'data', data)
    redis.call('EXPIRE', stream, ARGV[8])
    n = n + 1
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = redis.call('EXISTS', ARGV[7] .. id)
    claimed[#claimed + 1] = redis.call('HMGET', job, 'data', 'enqueued_at', 'retries_left')
  end
end
return claimed
"""


@dataclass(frozen=True)
class Claimed:
    """A job a claim took for this worker: its id, its request as the API stored it, when
    it was enqueued (unix seconds), the retries RQ has left for it, and whether a cancel
    was asked by the time of the claim. Read from the three fields of RQ's hash that the
    worker needs: building RQ's ``Job`` from the whole hash (``Job.restore`` parses every
    timestamp) was a tenth of a small job's worker CPU."""

    id: str
    request: dict[str, Any]
    enqueued_at: float | None
    retries_left: int | None
    canceled: bool

    @classmethod
    def of(cls, raw_id: bytes, canceled: int, fields: list[bytes | None]) -> Claimed:
        data, enqueued_at, retries_left = fields
        return cls(
            raw_id.decode(),
            job_request(data or b""),
            rq_time(enqueued_at),
            int(retries_left) if retries_left is not None else None,
            bool(canceled),
        )


def job_request(data: bytes) -> dict[str, Any]:
    """The request in RQ's ``data`` field of a job the API enqueued: the zlib-compressed
    JSON of (function, instance, args, kwargs), as ``Job.restore`` and ``Job.kwargs`` read
    it (data that is not compressed taken as it is, as RQ does)."""
    try:
        data = zlib.decompress(data)
    except zlib.error:
        pass
    return JSONSerializer.loads(data)[3]["request"]


def rq_time(value: bytes | None) -> float | None:
    """A timestamp RQ wrote (``utcformat``: ISO 8601 in UTC, with a Z) as unix seconds."""
    return datetime.fromisoformat(value.decode()).timestamp() if value else None


def claim(
    r: redis.Redis,
    group: str,
    queue: str,
    worker: str,
    limit: int,
    timeout: float,
    start: Start,
    pipe: Any = None,
) -> list[Claimed]:
    """Take up to ``limit`` jobs of ``group`` out of RQ's queue for this worker, each with
    its ``started`` event written. A claim not settled within ``timeout`` seconds counts
    as lost even if the worker lives (a batch that died on a Redis error must not strand
    its jobs). With ``pipe``, its commands go first in the same round trip."""
    if limit <= 0:
        return []
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    keys = [BATCH.format(group), Queue.redis_queue_namespace_prefix + queue, CLAIMS]
    keys.append(store.fence(worker))
    args = [limit, worker, started, Job.redis_job_namespace_prefix, time.time() + timeout]
    args += [store.EVENTS.format(""), store.CANCEL.format(""), start.ttl, start.maxlen]
    args += [start.retries, Event.STARTED]
    # EVAL with the script's text: a pipeline's EVALSHA costs a SCRIPT EXISTS round trip.
    pipe = pipe if pipe is not None else r.pipeline(transaction=False)
    reply = _after(pipe, lambda p: p.eval(_CLAIM, len(keys), *keys, *args))
    return [Claimed.of(*one) for one in zip(reply[::3], reply[1::3], reply[2::3], strict=True)]


# RQ's ending of jobs it did not run itself, as ``Job.set_status``, ``BaseRegistry.add`` and
# ``Job.cleanup`` (a positive TTL) write it, and their claims removed: one command for a
# batch, where those took six per job, each built through RQ's objects. KEYS: the claims
# hash. ARGV: RQ's job key prefix, ended_at, then per job: its id, RQ's status, its
# registry's key ('' for none: a canceled job is in none), the registry's score, the TTL.
_SETTLE = """
for i = 3, #ARGV, 5 do
  local id, registry, ttl = ARGV[i], ARGV[i + 2], ARGV[i + 4]
  local job = ARGV[1] .. id
  redis.call('HSET', job, 'status', ARGV[i + 1], 'ended_at', ARGV[2])
  if registry ~= '' then redis.call('ZADD', registry, ARGV[i + 3], id) end
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', job .. ':dependents', ttl)
  redis.call('EXPIRE', job .. ':dependencies', ttl)
  redis.call('HDEL', KEYS[1], id)
end
"""
_RQ_STATUS = {JobStatus.FINISHED: RQStatus.FINISHED, JobStatus.CANCELED: RQStatus.CANCELED}


def settle(
    pipe: Any, queue: str, ended: list[tuple[str, str]], result_ttl: int, failure_ttl: int
) -> None:
    """End claimed jobs of ``queue`` in RQ, on the pipeline that stores their results (or
    the one of the worker's next command): each (id, status) as RQ ends the jobs it runs:
    its status (a ``JobStatus``; any other ends it failed), ended_at, the finished or
    failed registry (none for a canceled job) and the hash's expiry."""
    if not ended:
        return
    now = rq_timestamp()
    args: list[Any] = [Job.redis_job_namespace_prefix, utcformat(rq_now())]
    for job_id, status in ended:
        ok = status == JobStatus.FINISHED
        ttl = result_ttl if ok else failure_ttl
        registry = FinishedJobRegistry if ok else FailedJobRegistry
        key = "" if status == JobStatus.CANCELED else registry.key_template.format(queue)
        args += [job_id, _RQ_STATUS.get(status, RQStatus.FAILED), key, now + ttl, ttl]
    pipe.eval(_SETTLE, 1, CLAIMS, *args)


def requeue_lost(
    r: redis.Redis,
    alive: Callable[[str], bool],
    on_requeue: Callable[[Job], None],
    result_ttl: int,
    failure_ttl: int,
) -> list[str]:
    """Put the claimed jobs of dead workers, and claims past their deadline, back at the
    front of their RQ queue; returns their ids. ``on_requeue`` tells the job's clients first
    (a ``retrying`` event). A claimed job whose result is stored is ended in RQ as it ended,
    never run again (its worker died between the result and ``settle``)."""
    lost = []
    for raw_id, raw_claim in r.hgetall(CLAIMS).items():
        job_id, (worker, _, deadline) = raw_id.decode(), raw_claim.decode().rpartition("|")
        if alive(worker) and time.time() < float(deadline or "inf"):
            continue
        try:
            job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - expired or not RQ's: nothing to put back
            job = None
        doc = store.get_result(r, job_id) if job is not None else None
        if doc is not None:  # its result is stored: the worker died before settling it
            pipe = r.pipeline(transaction=False)
            settle(pipe, job.origin, [(job_id, doc["status"])], result_ttl, failure_ttl)
            pipe.execute()
        elif job is not None and job.get_status(refresh=False) == RQStatus.STARTED:
            on_requeue(job)
            Queue(job.origin, connection=r, serializer=JSONSerializer).enqueue_job(
                job, at_front=True
            )
            lost.append(job_id)
        r.hdel(CLAIMS, job_id)
    if lost:
        log.warning("requeued %d claimed jobs of dead workers: %s", len(lost), lost)
    return lost
