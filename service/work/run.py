"""Batch orchestration and recording: for the jobs of one batch, the ``started`` events (and
cancels asked by then) of those the batch's claim did not start, the model from the cache,
one engine call (``classify``) or a streamed generation (``generate``), then each job's
result document or failure with its terminal event in one pipeline (a cancel asked
meanwhile is checked by the same write), RQ's bookkeeping, and the worker's metrics."""

from __future__ import annotations

import functools
import time

import redis

from engine.tasks import TaskName

from .. import batching, store
from .. import worker_metrics as m
from ..registry import ModelSpec
from ..vocabulary import Event, JobStatus
from . import documents, inputs
from .classify import classify
from .context import (
    JobCanceled,
    Outcome,
    Run,
    Work,
    WorkerState,
    leave_handed_on,
    one,
    state,
)
from .generate import generate


def warm(spec: ModelSpec) -> None:
    """Load a model, capture its graph and run it once on a sample input, so that the first
    request pays none of that (export, lazy initialisation of the rule sweep)."""
    entry, _ = state().load(spec)
    blank = inputs.blank(entry, spec)
    if blank is None:
        return
    batch = inputs.on_device(entry, blank)
    dlb = entry.backtrace(batch)
    if spec.task == TaskName.GENERATION:
        tok = entry.loaded.tokenizer
        dlb.run_task(task=TaskName.GENERATION, inputs=batch, tokenizer=tok, max_new_tokens=1)
    else:
        dlb.run_task(task=spec.task, inputs=batch, relevance_nodes="inputs")


def run_batch(
    st: WorkerState,
    r: redis.Redis,
    works: list[Work],
    primary: Work | None,
    settle: redis.client.Pipeline,
) -> Outcome | None:
    """Run the works as one batch and store every result; RQ's ending of the jobs claimed
    from the queue is queued on ``settle``, for the caller to send with its next command.
    Returns the outcome of ``primary`` (the job RQ handed out).

    The results go out in one pipeline, each written as ``canceled`` instead where a
    cancel was asked while the batch ran (``store.finish``): the clients' terminal events
    wait for no other round trip. RQ's bookkeeping needs those endings, so it follows."""
    outcomes = _outcomes(st, r, works)
    pipe = r.pipeline(transaction=False)
    written = [_write(st, pipe, w, o) for w, o in zip(works, outcomes, strict=True)]
    replies = pipe.execute()
    if any(x is None for x in replies):  # behind the fence: the jobs run elsewhere now
        leave_handed_on(st.name)
    switched = [isinstance(o, dict) and x == 1 for o, x in zip(outcomes, replies, strict=True)]
    ended = [JobCanceled() if c else o for o, c in zip(outcomes, switched, strict=True)]
    claimed: dict[str, list[tuple[str, str]]] = {}  # by queue: a batch's claims share one
    for w, o, n, c in zip(works, ended, written, switched, strict=True):
        status = _count(st, w, o, 0 if c else n)  # a canceled ending: a few bytes, not n
        if w is not primary and w.queue is not None:
            claimed.setdefault(w.queue, []).append((w.job_id, status))
    for queue, jobs in claimed.items():
        batching.settle(settle, queue, jobs, st.settings.result_ttl, st.settings.failure_ttl)
    return ended[0] if primary is not None else None


def _outcomes(st: WorkerState, r: redis.Redis, works: list[Work]) -> list[Outcome]:
    """The result document of each job, or the exception that ended it: its request is not
    valid, its model is not in this registry or cannot load, it was canceled, or it failed."""
    outcomes: list[Outcome | None] = [w.invalid() for w in works]
    valid = [w for w, o in zip(works, outcomes, strict=True) if o is None]
    if not valid:
        return _fill(outcomes, RuntimeError("not run"))
    req = valid[0].req  # model, task, relevance and output are the batch group's
    spec = st.registry.get(req.model)
    if spec is None:
        error = ValueError(f"model {req.model!r} is not in this worker's registry")
        return _fill(outcomes, error)
    canceled = _start(st, r, works)
    outcomes = [JobCanceled() if c else o for o, c in zip(outcomes, canceled, strict=True)]
    try:
        run, hit = Run.of(st, spec, req)
    except Exception as exc:  # noqa: BLE001 - the model cannot load: every job fails with it
        return _fill(outcomes, exc)
    _run(run, r, works, outcomes)
    for doc in outcomes:
        if isinstance(doc, dict):
            doc["timings"]["load_s"] = 0.0 if hit else run.entry.load_s
            doc["timings"]["cache"] = "hit" if hit else "miss"
    return _fill(outcomes, RuntimeError("not run"))


def _start(st: WorkerState, r: redis.Redis, works: list[Work]) -> list[bool]:
    """Whether a cancel was asked of each job by the time it starts; writes the ``started``
    events of the jobs whose claim did not (the one RQ handed out)."""
    retries, ttl, maxlen = st.settings.retries, st.settings.result_ttl, st.settings.stream_maxlen
    fresh = [
        (w.job_id, {"worker": st.name, "attempt": w.attempt(retries)})
        for w in works
        if not w.started
    ]
    started = store.start(r, fresh, ttl, maxlen, st.fence)
    if started is None:
        leave_handed_on(st.name)
    asked = iter(started or [])
    return [w.cancel_asked if w.started else next(asked) for w in works]


def _fill(outcomes: list[Outcome | None], exc: Exception) -> list[Outcome]:
    """The outcomes, with ``exc`` as the outcome of each job that has none yet."""
    return [exc if o is None else o for o in outcomes]


def _run(run: Run, r: redis.Redis, works: list[Work], outcomes: list[Outcome | None]) -> None:
    """Fill in the outcome of each job still to run (its outcome None)."""
    live = [i for i, o in enumerate(outcomes) if o is None]
    if run.task == TaskName.GENERATION:  # never batched: it streams per step
        for i in live:
            outcomes[i] = one(functools.partial(generate, run, works[i], r))
        return
    for i, outcome in zip(live, classify(run, [works[i] for i in live]), strict=True):
        outcomes[i] = outcome


def _write(st: WorkerState, pipe: redis.client.Pipeline, w: Work, outcome: Outcome) -> int:
    """Store the job's result (or error) and its terminal event on ``pipe``; a result is
    written as ``canceled`` instead if a cancel was asked meanwhile (the pipeline's reply
    for it is then 1). Returns the bytes written."""
    model_id, task = w.labels
    ttl, maxlen = st.settings.result_ttl, st.settings.stream_maxlen
    if isinstance(outcome, dict):
        doc = outcome
        doc["timings"] = {"queue_wait_s": w.queue_wait, **doc["timings"]}
        doc["timings"]["total_s"] = time.time() - w.picked
        doc["ended_at"] = documents.now()
        data = {"status": JobStatus.FINISHED, "summary": doc.get("summary", {})}
        data["timings"] = doc["timings"]
        canceled = _failure(model_id, task, JobCanceled())
        done = store.Ending(Event.DONE, data, doc)
        return store.finish(pipe, w.job_id, done, ttl, maxlen, canceled, st.fence)
    failure = _failure(model_id, task, outcome)
    return store.finish(pipe, w.job_id, failure, ttl, maxlen, fence=st.fence)


def _status(outcome: Outcome) -> JobStatus:
    """The final status a job's outcome stands for."""
    if isinstance(outcome, dict):
        return JobStatus.FINISHED
    return JobStatus.CANCELED if isinstance(outcome, JobCanceled) else JobStatus.FAILED


def _failure(model_id: str, task: str | None, exc: Exception) -> store.Ending:
    status = _status(exc)
    doc = documents.failure(model_id, task, status, exc)
    event = Event.CANCELED if status == JobStatus.CANCELED else Event.ERROR
    return store.Ending(event, doc["error"], doc)


def _count(st: WorkerState, w: Work, outcome: Outcome, written: int) -> JobStatus:
    """The job's final status, counted in the worker's metrics with the bytes written."""
    model_id, task = w.labels
    spec = st.registry.get(model_id)
    task = task or (spec.task if spec else "unknown")
    status = _status(outcome)
    m.job_ended(task, model_id, status, w.queue_wait, time.time() - w.picked, written)
    return status
