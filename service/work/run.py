"""Batch orchestration and recording: for the jobs of one batch, the ``started`` events (and
cancels asked meanwhile) in one round trip, the model from the cache, one engine call
(``classify``) or a streamed generation (``generate``), then each job's result document or
failure with its terminal event, in one pipeline, and the worker's metrics."""

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
from .context import JobCanceled, Outcome, Run, Work, WorkerState, one, state
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
    st: WorkerState, r: redis.Redis, works: list[Work], primary: Work | None
) -> Outcome | None:
    """Run the works as one batch and store every result; the jobs claimed from the queue
    are also ended in RQ. Returns the outcome of ``primary`` (the job RQ handed out)."""
    outcomes = _outcomes(st, r, works)
    pipe = r.pipeline(transaction=False)
    for w, o in zip(works, outcomes, strict=True):
        status = _record(st, pipe, w, o)
        if w is not primary and w.job is not None:
            batching.settle(pipe, w.job, status, st.settings.result_ttl, st.settings.failure_ttl)
    pipe.execute()
    return outcomes[0] if primary is not None else None


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
    retries, ttl, maxlen = st.settings.retries, st.settings.result_ttl, st.settings.stream_maxlen
    starts = [(w.job_id, {"worker": st.name, "attempt": w.attempt(retries)}) for w in works]
    canceled = store.start(r, starts, ttl, maxlen)
    outcomes = [JobCanceled() if c else o for o, c in zip(outcomes, canceled, strict=True)]
    try:
        run, hit = Run.of(st, spec, req)
    except Exception as exc:  # noqa: BLE001 - the model cannot load: every job fails with it
        return _fill(outcomes, exc)
    _run(run, r, works, outcomes)
    ok = [i for i, o in enumerate(outcomes) if isinstance(o, dict)]
    asked = store.cancels_requested(r, [works[i].job_id for i in ok])
    for i, c in zip(ok, asked, strict=True):
        doc = outcomes[i]
        assert isinstance(doc, dict)
        if c:
            outcomes[i] = JobCanceled()
            continue
        doc["timings"]["load_s"] = 0.0 if hit else run.entry.load_s
        doc["timings"]["cache"] = "hit" if hit else "miss"
    return _fill(outcomes, RuntimeError("not run"))


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


def _record(st: WorkerState, pipe: redis.client.Pipeline, w: Work, outcome: Outcome) -> JobStatus:
    """Store the job's result (or error) and its terminal event on ``pipe``; update the
    metrics; return the job's final status."""
    model_id, task = w.labels
    spec = st.registry.get(model_id)
    task = task or (spec.task if spec else "unknown")
    total = time.time() - w.picked
    if isinstance(outcome, dict):
        doc, status, event = outcome, JobStatus.FINISHED, Event.DONE
        doc["timings"] = {"queue_wait_s": w.queue_wait, **doc["timings"], "total_s": total}
        doc["ended_at"] = documents.now()
        data = {"status": status, "summary": doc.get("summary", {}), "timings": doc["timings"]}
    else:
        canceled = isinstance(outcome, JobCanceled)
        status = JobStatus.CANCELED if canceled else JobStatus.FAILED
        event = Event.CANCELED if canceled else Event.ERROR
        doc = documents.failure(model_id, task, status, outcome)
        data = doc["error"]
    ttl, maxlen = st.settings.result_ttl, st.settings.stream_maxlen
    written = store.finish(pipe, w.job_id, doc, event, data, ttl, maxlen)
    if w.queue_wait is not None:
        m.QUEUE_WAIT.labels(task=task, model=model_id).observe(w.queue_wait)
    m.JOBS.labels(task=task, model=model_id, status=status).inc()
    m.RUN.labels(task=task, model=model_id).observe(total)
    m.TRACE_BYTES.labels(model=model_id).inc(written)
    return status
