"""What the worker's code shares, at three scopes: the process (``WorkerState``, kept across
jobs because the model cache is what makes a warm request fast), a batch (``Run``: the jobs of
one batch group share the model, task and every parameter) and a job (``Work``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis
from pydantic import ValidationError
from rq.job import Job

from engine.tasks import TaskName

from .. import heap, load_failures, store
from .. import worker_metrics as m
from ..batching import Claimed
from ..config import Settings
from ..models import CachedModel, ModelCache
from ..registry import ModelSpec, Registry, load_registry
from ..schemas import RunTaskRequest, no_labels
from ..vocabulary import WorkerExit

log = logging.getLogger("service.worker")

# A job's end: its result document, or the exception that is its failure.
Outcome = dict[str, Any] | Exception
# The engine's relevance keywords that a request sets, with the schema's defaults.
ENGINE_RELEVANCE = {"mode", "multiplier", "scaler", "thresholding", "temperature"}


class JobCanceled(Exception):
    """Raised at a checkpoint when a client asked to cancel the running job."""

    def __init__(self) -> None:
        super().__init__("canceled by request")


def one(fn: Callable[[], dict[str, Any]]) -> Outcome:
    """``fn()``'s document, or the exception that is the job's failure."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
        return exc


@dataclass
class WorkerState:
    """One per worker process: its settings, the registry it serves, the model cache."""

    settings: Settings
    registry: Registry
    cache: ModelCache
    name: str
    reports: ModelReports | None = None

    @property
    def fence(self) -> str:
        """The key behind which this worker's writes to job streams go (``store.LOST``)."""
        return store.fence(self.name)

    def load(self, spec: ModelSpec) -> tuple[CachedModel, bool]:
        """The cached model for ``spec`` (loaded on a miss) and whether it was a hit. A
        load that fails is reported for ``GET /models`` (``service.load_failures``), as is
        the next one that succeeds."""
        try:
            entry, hit = self.cache.get(spec)
        except Exception as exc:
            if self.reports is not None:
                self.reports.load_failed(spec.id, self.name, exc)
            raise
        (m.CACHE_HITS if hit else m.CACHE_MISSES).labels(model=spec.id).inc()
        if not hit:
            heap.settle()  # a model joined the long-lived objects, and others may have left
            m.LOAD.labels(model=spec.id).observe(entry.load_s)
            if self.reports is not None:
                self.reports.loaded(spec.id)
        return entry, hit


class ModelReports:
    """What a worker tells the API of its models, on a connection of its own opened at the
    first report: a captured graph's node names (``store.publish_graph``, for the check of
    ``output.relevance``; ``on_capture`` of the cache) and loads that failed
    (``service.load_failures``). A failed write is logged, never the job's failure: the
    worker checks the names itself, and the job's error says why the model did not load."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self._r: redis.Redis | None = None

    def __call__(
        self, model_id: str, revision: str, nodes: list[str], signature: dict[str, Any]
    ) -> None:
        self._write(
            f"the graph of {model_id}", store.publish_graph, model_id, revision, nodes, signature
        )

    def load_failed(self, model_id: str, worker: str, exc: Exception) -> None:
        self._write(
            f"the load failure of {model_id}", load_failures.report, model_id, worker, str(exc)
        )

    def loaded(self, model_id: str) -> None:
        self._write(f"the load of {model_id}", load_failures.clear, model_id)

    def _write(self, what: str, write: Callable[..., None], *args: Any) -> None:
        try:
            self._r = self._r or store.connect(self.redis_url, patient=True)
            write(self._r, *args)
        except redis.RedisError:
            log.warning("could not publish %s", what, exc_info=True)


def leave_handed_on(worker: str) -> None:
    """A write of this worker was refused behind its fence: the reaper took it for dead
    (its heartbeat stopped: the process was stopped or stalled) and handed its jobs on to
    other workers, which now run them. Leave at once, writing nothing more and leaving
    RQ's record of those jobs to their new runs, with ``WorkerExit.LOST``, so that whatever
    runs the worker starts a fresh one."""
    log.error("worker %s was taken for dead and its jobs handed on: exiting", worker)
    logging.shutdown()
    os._exit(WorkerExit.LOST)


_STATE: WorkerState | None = None


def init_worker(settings: Settings | None = None, name: str | None = None) -> WorkerState:
    """Process-wide state: the registry and the model cache (kept across jobs), which
    publishes the node names of each graph it captures and the loads that fail
    (``ModelReports``)."""
    global _STATE
    settings = settings or Settings()
    registry = load_registry(settings.registry_path)
    reports = ModelReports(settings.redis_url)
    name = name or store.worker_id()
    cache = ModelCache(
        registry,
        settings.data_dir,
        settings.cache_bytes,
        reports,
        on_failure=lambda model_id, exc: reports.load_failed(model_id, name, exc),
    )
    _STATE = WorkerState(settings, registry, cache, name, reports)
    return _STATE


def state() -> WorkerState:
    return _STATE or init_worker()


@dataclass
class Work:
    """One job as the worker runs it. ``request`` is as the API stored it; ``queue`` is the
    RQ queue it was taken from (None when called directly), ``enqueued_at`` when it was put
    there (unix seconds) and ``retries_left`` RQ's count of its retries; ``picked`` is when
    this worker took it. A job claimed for a batch is ``started`` already (the claim wrote
    its event) and knows whether a cancel was asked by then (``cancel_asked``)."""

    job_id: str
    request: dict[str, Any]
    queue: str | None = None
    enqueued_at: float | None = None
    retries_left: int | None = None
    picked: float = field(default_factory=time.time)
    started: bool = False
    cancel_asked: bool = False

    @classmethod
    def handed_out(cls, job: Job, request: dict[str, Any]) -> Work:
        """The job RQ handed this worker."""
        enqueued = job.enqueued_at.timestamp() if job.enqueued_at is not None else None
        return cls(job.id, request, job.origin, enqueued, job.retries_left)

    @classmethod
    def claimed(cls, job: Claimed, queue: str) -> Work:
        """A job a batch's claim took from ``queue`` (``service.batching``)."""
        return cls(
            job.id,
            job.request,
            queue,
            job.enqueued_at,
            job.retries_left,
            started=True,
            cancel_asked=job.canceled,
        )

    @cached_property
    def req(self) -> RunTaskRequest:
        """The stored request, validated with the model the API validated it with, so its
        defaults are the schema's. Raises ValidationError for a job written to the queue
        without the API."""
        return RunTaskRequest.model_validate(self.request)

    def invalid(self) -> ValidationError | None:
        """Why the stored request is not a valid request, if it is not."""
        try:
            self.req  # noqa: B018 - validates once; cached for the run
        except ValidationError as exc:
            return exc
        return None

    @property
    def labels(self) -> tuple[str, str | None]:
        """Model id and task as the stored request names them (the API resolves ``auto``),
        for the result document and the metrics even of a request that is not valid."""
        return str(self.request.get("model")), self.request.get("task")

    @property
    def queue_wait(self) -> float | None:
        if self.enqueued_at is None:
            return None
        return max(0.0, self.picked - self.enqueued_at)

    def attempt(self, retries: int) -> int:
        """Which run of the job this is (RQ's Retry re-runs a job whose worker died)."""
        if self.retries_left is None:
            return 1
        return 1 + max(0, retries - self.retries_left)


@dataclass(frozen=True)
class Run:
    """What the jobs of one batch share: they are of one batch group (``service.batching``),
    so they name one model, task, relevance and output options; only their inputs differ."""

    state: WorkerState
    spec: ModelSpec
    task: TaskName
    entry: CachedModel

    @classmethod
    def of(cls, state: WorkerState, spec: ModelSpec, req: RunTaskRequest) -> tuple[Run, bool]:
        """The run of ``req``'s batch on its (cached) model, and whether the cache hit."""
        entry, hit = state.load(spec)
        task = TaskName(spec.task if req.task == TaskName.AUTO else req.task)
        return cls(state, spec, task, entry), hit


def requested_relevance(req: RunTaskRequest) -> dict[str, Any]:
    """The relevance keywords of ``run_task`` that a request sets, as it set them (target,
    reference and relevance_nodes are passed on their own where they apply); ``contrast_with``
    only when given. What a result's receipt records."""
    params = req.relevance.model_dump(include=ENGINE_RELEVANCE)
    if req.relevance.contrast_with is not None:
        params["contrast_with"] = req.relevance.contrast_with
    return params


def engine_relevance(req: RunTaskRequest, labels: list[str] | None) -> dict[str, Any]:
    """``requested_relevance`` as the engine takes it: a label in ``contrast_with`` as its
    index among the model's ``labels`` (the registry's, else its config's: the engine knows
    labels only from a transformers config). A label for a model with none fails in the
    door's words, not with the engine's lookup among no labels."""
    params = requested_relevance(req)
    alt = params.get("contrast_with")
    if isinstance(alt, str) and alt not in ("runner-up", "rest"):
        if not labels:
            raise ValueError(f"relevance.contrast_with: {alt!r}: {no_labels(req.model, None)}")
        params["contrast_with"] = labels.index(alt) if alt in labels else alt
    return params
