"""The job the API enqueues by dotted path (``service.jobs.run_job``): take the queued jobs
of its batch group and hand them to the worker's modules (``service.work``), which run the
engine on a cached model, stream events and store the results in Redis.

Runs inside an RQ ``SimpleWorker``. Arguments and return value go through RQ's JSON
serializer, so only plain JSON crosses the queue; arrays are written by us as raw bytes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from rq import get_current_job

from . import batching, store
from . import worker_metrics as m
from .vocabulary import JobStatus
from .work.context import Work, WorkerState, state
from .work.run import run_batch

log = logging.getLogger("service.worker")

# How long a job keeps running further batches of its group that arrive meanwhile; bounded
# so that jobs of other models behind it in the queue are not starved.
BATCH_ROUNDS_S = 0.5
# How long a job with no more of its group queued waits for one to arrive before it goes
# back to RQ (within BATCH_ROUNDS_S). Ending a job and dequeuing the next costs RQ about a
# dozen Redis round trips, all before the next job starts; under closed-loop load the next
# job of the group usually arrives within milliseconds of the last batch's end.
BATCH_WAIT_S = 0.03


def run_job(request: dict[str, Any]) -> dict[str, Any]:
    """Entry point enqueued by the API as ``service.jobs.run_job``.

    A classification job also takes the queued jobs of its batch group (``service.batching``)
    and runs them in the same engine call; it ends those itself. While more of them keep
    arriving (waiting up to ``BATCH_WAIT_S`` for the next) it runs further batches of the
    group, up to ``BATCH_ROUNDS_S``: under steady load that skips RQ's own round trips
    between batches (about a dozen per job), which were most of the time a request waited
    in the queue. Every failure inside is deterministic (bad input, the model raised,
    timeout), so it is recorded with its message and not retried; RQ's Retry only re-runs
    jobs whose worker died under them. A BaseException (a cold
    shutdown of the worker) is left to RQ: the job is then abandoned and retried, and the
    claimed jobs are put back by the reaper."""
    st = state()
    job = get_current_job()
    job_id = job.id if job is not None else "local"  # called directly, without RQ
    r = job.connection if job is not None else store.connect(st.settings.redis_url)
    primary = Work.handed_out(job, request) if job is not None else Work(job_id, request)
    group = batching.group_key(request)
    batched = job is not None and group is not None and st.settings.max_batch > 1
    start = batching.Start(st.settings.result_ttl, st.settings.stream_maxlen, st.settings.retries)

    # RQ's bookkeeping of the claimed jobs of each batch (``batching.settle``) travels with
    # the next claim or wait: their results are stored already, and it saves a round trip.
    settle = r.pipeline(transaction=False)

    def claim(n: int) -> list[Work]:
        if not batched:
            return []
        timeout = st.settings.job_timeout + 60  # as RQ's own started-job registry
        jobs = batching.claim(r, group, job.origin, st.name, n, timeout, start, settle)
        return [Work.claimed(j, job.origin) for j in jobs]

    outcome = run_batch(st, r, [primary, *claim(st.settings.max_batch - 1)], primary, settle)
    try:  # the primary's result is stored: nothing after this may fail or rerun its job
        if batched:
            _further_batches(st, r, group, claim, settle)
    except Exception:  # noqa: BLE001 - logged; the jobs claimed meanwhile go to the reaper
        log.warning("stopped running further batches of %s", group, exc_info=True)
    finally:
        _send(settle)
    m.update_gpu_memory()
    if isinstance(outcome, Exception):
        if job is not None:
            job.retries_left = 0  # deterministic: a retry would fail the same way
        raise outcome
    return {"status": JobStatus.FINISHED}


def _further_batches(
    st: WorkerState,
    r: redis.Redis,
    group: str,
    claim: Callable[[int], list[Work]],
    settle: redis.client.Pipeline,
) -> None:
    """Run the batches of ``group`` that keep arriving, for up to ``BATCH_ROUNDS_S``."""
    until, waited = time.monotonic() + BATCH_ROUNDS_S, False
    while (left := until - time.monotonic()) > 0:
        if works := claim(st.settings.max_batch):
            run_batch(st, r, works, None, settle)
            waited = False
        elif waited or not batching.wait(r, group, min(BATCH_WAIT_S, left), settle):
            break
        else:
            waited = True  # one of the group arrived: claim it (another worker may have)


def _send(settle: redis.client.Pipeline) -> None:
    """RQ's settling of the last batch's claimed jobs, if any is left to send. On a Redis
    error they keep their claims, which the reaper settles from their stored results once
    the claims' deadline passes (``batching.requeue_lost``)."""
    if not len(settle):
        return
    try:
        settle.execute()
    except redis.RedisError:
        log.warning("could not settle claimed jobs in RQ; the reaper will", exc_info=True)
