"""Jobs whose worker died, found within seconds by the workers' own heartbeat keys.

RQ's ``SimpleWorker`` registers a running job in the StartedJobRegistry with an expiry of
job_timeout + 60 s and sends no heartbeat while the job runs, so on its own RQ notices a
SIGKILLed worker's job only minutes later. Every worker refreshes ``bt:worker:<name>`` with a
short TTL from a thread (``service.worker``): a started job whose worker's key is gone is lost.
``reap`` marks such a job's registry entry expired and lets RQ's own abandoned-job handling
(``StartedJobRegistry.cleanup``) retry it when retries are left, else fail it. Before RQ does,
it writes what our clients read: a ``retrying`` event, or the failed result with a terminal
``error`` event, so that SSE streams end instead of hanging. Jobs that a dead worker had
claimed for a batch are put back at the front of the queue (``service.batching``). A job
still running well past its timeout on a live worker is one that the worker cannot stop: it
is failed with that reason and the worker is marked stuck (``_fail_stuck``). A job a worker
took from the queue but never started goes back to it (``_requeue_untaken``).

Workers and API processes all call ``reap`` periodically (the API too, so that jobs are ended
even when no worker is left); a short Redis lock lets one of them do it at a time. No torch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from . import batching, store
from .vocabulary import TERMINAL_EVENTS, Event, JobStatus

LOCK = "bt:reaper"
# A worker whose job ran past its timeout without the worker stopping it: the reason, by
# worker name (``_fail_stuck``).
STUCK = "bt:stuck:{}"
# When the reaper first saw a job in its queue's intermediate list (``_requeue_untaken``).
UNTAKEN = "bt:untaken:{}"
log = logging.getLogger("service.reaper")


def reap(
    r: redis.Redis, queue: str, heartbeat_ttl: int, result_ttl: int, failure_ttl: int
) -> list[str]:
    """Hand the started jobs of dead workers to RQ's abandoned-job handling, and fail those
    stuck past their timeout on live ones; returns their ids. A no-op while another
    process reaps, and while Redis itself has been up for less than a heartbeat TTL (after
    a restart, live workers may not have written theirs yet)."""
    if _resumed_lately(heartbeat_ttl):
        return []
    if not r.set(LOCK, "1", nx=True, px=max(500, heartbeat_ttl * 500)):
        return []
    if int(r.info("server")["uptime_in_seconds"]) < heartbeat_ttl:
        return []
    registry = StartedJobRegistry(queue, connection=r, serializer=JSONSerializer)
    lost = []

    def alive(worker: str) -> bool:
        return bool(r.exists(store.WORKER.format(worker)))

    now, stuck = _redis_now(r), []
    for member in r.zrange(registry.key, 0, -1):
        job_id = _job_id(member)
        if job_id is None:
            r.zrem(registry.key, member)
            continue
        fields = r.hmget(f"rq:job:{job_id}", "worker_name", "started_at", "timeout", "status")
        if not fields[0]:
            continue
        worker = fields[0].decode(errors="replace")
        if alive(worker):
            if (timeout := _overrun(fields, now, overrun_grace(heartbeat_ttl))) is not None:
                _fail_stuck(r, registry.key, member, worker, timeout, (result_ttl, failure_ttl))
                stuck.append(job_id)
            continue
        doc = store.get_result(r, job_id)
        if doc is not None:  # it ended; its worker died before telling RQ
            _end_in_rq(r, registry.key, member, doc["status"], result_ttl, failure_ttl)
            log.warning("job %s ended before its worker %s died: ended it in RQ", job_id, worker)
            continue
        _fence(r, worker, failure_ttl)
        r.zadd(registry.key, {member: 0}, xx=True)
        lost.append(job_id)
    if lost:
        registry.cleanup(timestamp=1, exception_handlers=[_tell_clients(r, result_ttl)])
    tell = _tell_requeued(r, alive, result_ttl, failure_ttl)
    untaken = _requeue_untaken(r, queue, now, heartbeat_ttl, result_ttl)
    return stuck + lost + untaken + batching.requeue_lost(r, alive, tell, result_ttl, failure_ttl)


def _fence(r: redis.Redis, worker: str, failure_ttl: int) -> None:
    """Before a dead worker's job is handed on: refuse that worker's writes to job streams
    from now on (``store.LOST``). A worker is taken for dead when its heartbeat stops, and
    one that was only stopped or stalled may resume: it then leaves at its next write
    (``service.work.context.leave_handed_on``) instead of writing into the job's new run."""
    r.set(store.fence(worker), "its jobs were handed on", ex=failure_ttl)


def end_unfinished(r: redis.Redis, why: str, ttl: int) -> list[str]:
    """End every job whose stream has no ending yet as failed (``ServiceStopped``, saying
    ``why``), for a service whose private Redis goes with it: its queued and running jobs
    can never end otherwise. Returns their ids."""
    ended = []
    for key in r.scan_iter(match=store.EVENTS.format("*"), count=1000):
        last = r.xrevrange(key, count=1)
        if not last or last[0][1].get(b"event", b"").decode(errors="replace") in TERMINAL_EVENTS:
            continue
        job_id = key.decode().removeprefix(store.EVENTS.format(""))
        error = {"type": "ServiceStopped", "message": why}
        doc = {"status": JobStatus.FAILED, **_meta(r, job_id), "error": error}
        store.finish(r, job_id, store.Ending(Event.ERROR, error, doc), ttl)
        ended.append(job_id)
    return ended


def _requeue_untaken(
    r: redis.Redis, queue: str, now: float, heartbeat_ttl: int, result_ttl: int
) -> list[str]:
    """Put back at the front of the queue the jobs that a worker took (RQ moves each from
    the queue to its intermediate list) but never started: the worker died in between, as
    one does when Redis refuses its next write (out of memory) and RQ's loop raises. Such a
    job said ``queued`` while in no queue, until RQ's own cleanup, run by a worker's
    maintenance at most once a minute and only on a job's second sighting there, failed or
    retried it minutes later. A job counts as untaken once it has been seen there, still
    queued, for a heartbeat TTL (a live worker starts its job within milliseconds)."""
    intermediate = IntermediateQueue.get_intermediate_queue_key(f"rq:queue:{queue}")
    back = []
    for raw in r.lrange(intermediate, 0, -1):
        job_id = raw.decode(errors="replace")
        if r.hget(f"rq:job:{job_id}", "status") != b"queued":
            r.delete(UNTAKEN.format(job_id))
            continue
        r.set(UNTAKEN.format(job_id), now, nx=True, ex=max(60, 4 * heartbeat_ttl))
        if now - float(r.get(UNTAKEN.format(job_id)) or now) < heartbeat_ttl:
            continue
        reason = "a worker took the job from the queue and stopped before starting it"
        store.add_event(r, job_id, Event.RETRYING, {"reason": reason, "requeued": True}, result_ttl)
        pipe = r.pipeline()
        pipe.lrem(intermediate, 1, job_id)
        pipe.lpush(f"rq:queue:{queue}", job_id)
        pipe.delete(UNTAKEN.format(job_id))
        pipe.execute()
        log.warning("job %s: %s; put back at the front of the queue", job_id, reason)
        back.append(job_id)
    return back


class _Passes:
    """When this process last called ``reap``, and when it came back from a pause."""

    last: float | None = None
    resumed: float = float("-inf")


def _resumed_lately(heartbeat_ttl: int) -> bool:
    """Whether this process was paused (no pass for over a heartbeat TTL: the machine
    stalled, the process was stopped) less than a heartbeat TTL ago. The heartbeats of
    workers paused with it have expired meanwhile; they beat again within a third of a TTL
    of coming back, so until a whole TTL has passed their absence is no evidence. Before,
    the first pass after a stall of the machine handed the jobs of live workers on: each
    then ran twice, both runs writing to one stream."""
    now = time.monotonic()
    if _Passes.last is not None and now - _Passes.last > heartbeat_ttl:
        _Passes.resumed = now
    _Passes.last = now
    return now - _Passes.resumed < heartbeat_ttl


def overrun_grace(heartbeat_ttl: int) -> int:
    """How long past its timeout a job may still be running before its worker counts as
    stuck: twice the heartbeat TTL, at least 10 s (RQ's own timeout has long fired by then,
    unless the worker cannot run Python to let it)."""
    return max(10, 2 * heartbeat_ttl)


def _redis_now(r: redis.Redis) -> float:
    """Redis's clock, the one reference every worker's and API's reaper shares."""
    seconds, micros = r.time()
    return seconds + micros / 1e6


def _overrun(fields: list[bytes | None], now: float, grace: int) -> int | None:
    """The job's timeout when it is still ``started`` more than ``grace`` seconds past it
    (``fields``: RQ's worker_name, started_at, timeout and status), else None."""
    _, started_at, timeout, status = fields
    if status != b"started" or not started_at or not timeout:
        return None
    try:
        started = datetime.fromisoformat(started_at.decode().replace("Z", "+00:00"))
        limit = int(timeout)
    except ValueError:
        return None
    return limit if now - started.timestamp() > limit + grace else None


def _fail_stuck(
    r: redis.Redis, registry: str, member: bytes, worker: str, timeout: int, ttls: tuple[int, int]
) -> None:
    """End a job that ran past its timeout on a worker that is still alive, failed with the
    reason, and mark the worker stuck (``STUCK``). RQ's timeout is a signal that Python
    handles between bytecodes, so a job stuck in native code, or in a call that never
    returns, was never stopped: it stayed ``started`` for good, its stream open, its worker
    taking no job yet counted ready, and RQ's abandoned-job handling, once it came,
    retried it on the next worker, which it hung too. /readyz leaves a stuck worker out,
    and a supervisor kills it (``service.liveness``) to start another."""
    job_id, _ = parse_composite_key(member.decode())
    message = (
        f"the job ran past its timeout of {timeout} s, and its worker {worker} could not stop "
        "it: the worker is stuck (in native code, or a call that does not return) and is "
        "taken out of service"
    )
    error = {"type": "JobTimeout", "message": message}
    meta = _meta(r, job_id)
    doc = {"status": JobStatus.FAILED, **meta, "error": error}
    store.finish(r, job_id, store.Ending(Event.ERROR, error, doc), ttls[0])
    _end_in_rq(r, registry, member, JobStatus.FAILED, *ttls)
    r.set(STUCK.format(worker), message, ex=ttls[1])
    log.error("job %s: %s", job_id, message)


def _meta(r: redis.Redis, job_id: str) -> dict[str, Any]:
    """The model and task the API recorded in the job's RQ meta (empty if unreadable)."""
    try:
        meta = Job.fetch(job_id, connection=r, serializer=JSONSerializer).meta or {}
    except Exception:  # noqa: BLE001 - its hash is gone or not RQ's: the error says enough
        return {}
    return {"model": meta.get("model"), "task": meta.get("task")}


def _job_id(member: bytes) -> str | None:
    """The job id of a started-registry entry (``job_id:execution_id``), or None for an
    entry that is not one (written by hand, or by another program): the caller removes it,
    so that one odd entry stops neither the reaping of every other job (it raised on every
    pass, and the API's reaper task died at the first) nor RQ's own cleanup of the
    registry, which parses every expired entry the same way."""
    try:
        job_id, _ = parse_composite_key(member.decode())
    except ValueError:  # UnicodeDecodeError too
        log.warning("started registry entry %r is not job_id:execution_id: removed", member)
        return None
    return job_id


def _end_in_rq(
    r: redis.Redis, registry: str, member: bytes, status: str, result_ttl: int, failure_ttl: int
) -> None:
    """End in RQ a job whose result is already stored, instead of running it again: its
    worker died after writing the result (for example while it ran further batches of the
    job's group, or before RQ's own bookkeeping), and its clients have seen it end. Its
    execution record goes with its started-registry entry (``member``), as RQ's own
    bookkeeping would remove them."""
    job_id, execution_id = parse_composite_key(member.decode())
    try:
        job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    except Exception:  # noqa: BLE001 - its hash expired: only the registry entry is left
        r.zrem(registry, member)
        return
    pipe = r.pipeline(transaction=False)
    batching.settle(pipe, job.origin, [(job.id, status)], result_ttl, failure_ttl)
    execution = Execution(execution_id, job_id, r, worker_name=job.worker_name or "")
    execution.delete(job, pipe)
    pipe.execute()


def _tell_requeued(
    r: redis.Redis, alive: Callable[[str], bool], result_ttl: int, failure_ttl: int
) -> Any:
    """Tell a batched job's clients that it goes back to the queue, fencing its worker
    first if that is taken for dead (``_fence``)."""

    def tell(job: Job) -> None:
        if job.worker_name and not alive(job.worker_name):
            _fence(r, job.worker_name, failure_ttl)
        reason = f"worker {job.worker_name} did not finish the job in a batch (it stopped, or "
        reason += "the batch failed)"
        data = {"reason": reason, "requeued": True}
        store.add_event(r, job.id, Event.RETRYING, data, result_ttl)

    return tell


def _tell_clients(r: redis.Redis, result_ttl: int) -> Any:
    """An RQ exception handler, called for each lost job before RQ retries or fails it."""

    def handler(job: Job, *_exc_info: Any) -> bool:
        retry = bool(job.retries_left and job.retries_left > 0)
        reason = f"worker {job.worker_name} stopped while running the job (no heartbeat)"
        log.warning("job %s lost: %s; %s", job.id, reason, "retrying" if retry else "failed")
        if retry:
            data = {"reason": reason, "retries_left": job.retries_left - 1}
            store.add_event(r, job.id, Event.RETRYING, data, result_ttl)
        else:
            error = {"type": "WorkerLost", "message": f"{reason}; no retries left"}
            meta = job.meta or {}
            doc = {
                "status": JobStatus.FAILED,
                "model": meta.get("model"),
                "task": meta.get("task"),
                "error": error,
            }
            store.finish(r, job.id, store.Ending(Event.ERROR, error, doc), result_ttl)
        return True

    return handler
