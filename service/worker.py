"""An RQ ``SimpleWorker`` with a warm model cache, a heartbeat and its own /metrics.

``SimpleWorker`` runs jobs in this process (no fork per job), which is what keeps models and
captured graphs warm and makes CUDA usable; one such process per GPU. Recycle it with
``max_jobs`` under a supervisor to bound memory growth."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from . import reaper, store
from . import worker_metrics as m
from .config import Settings
from .registry import Registry
from .work import run
from .work.context import JobCanceled, init_worker, state

log = logging.getLogger("service.worker")


class Worker(SimpleWorker):
    """RQ's ``SimpleWorker`` with fewer heartbeats. RQ refreshes its worker key three times
    per job, three Redis round trips each, for a key that lives ``worker_ttl`` + 60 s (8
    minutes by default): a third of a small job's round trips. Here a heartbeat outside a
    pipeline is sent only when the last one is older than ``HEARTBEAT_EVERY_S``. Liveness
    that matters (a dead worker's jobs) comes from our own heartbeat thread anyway."""

    HEARTBEAT_EVERY_S = 10.0

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        last = self.last_heartbeat
        if pipeline is None and last is not None:
            if (datetime.now(UTC) - last).total_seconds() < self.HEARTBEAT_EVERY_S:
                return
        super().heartbeat(timeout, pipeline)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A job canceled by request is logged in one line: it is an ending a client asked
        for, not an error with a traceback worth reading."""
        if isinstance(exc_info[1], JobCanceled):
            self.log.info("Worker %s: job %s canceled by request", self.name, job.id)
            return
        super().handle_exception(job, *exc_info)


def _heartbeat_loop(settings: Settings, name: str, stop: threading.Event) -> None:
    """Our own liveness key, refreshed three times per TTL from a thread: RQ's SimpleWorker
    sends no heartbeat while a job runs, and a killed worker stays registered for minutes.
    Each beat also ends the jobs of workers whose key has expired (``service.reaper``)."""
    r = store.connect(settings.redis_url, patient=True)
    st = state()
    ttl = settings.heartbeat_ttl
    while not stop.is_set():
        try:
            info = {
                "name": name,
                "pid": os.getpid(),
                "queue": settings.queue,
                "models": st.cache.warm_ids(),
            }
            store.heartbeat(r, name, info, ttl)
            reaper.reap(r, settings.queue, ttl, settings.result_ttl, settings.failure_ttl)
        except Exception:  # noqa: BLE001 - Redis blips must not kill the worker
            log.warning("heartbeat failed", exc_info=True)
        stop.wait(ttl / 3)
    r.delete(store.WORKER.format(name))


def _warm(registry: Registry, wanted: list[str]) -> None:
    """Load, capture and run once each wanted model, with a log line per model, before the
    heartbeat starts: /readyz counts a worker only once it serves every warm model without
    a capture. A model that cannot warm is logged and left to load on first use."""
    ids = list(dict.fromkeys(wanted))
    for i, model_id in enumerate(ids, 1):
        spec = registry.get(model_id)
        if spec is None:
            log.warning("cannot warm %s: not in the registry", model_id)
            continue
        log.info("warming %s (%d of %d)", model_id, i, len(ids))
        t0 = time.perf_counter()
        try:
            run.warm(spec)
        except Exception:  # noqa: BLE001 - a broken entry must not stop the others
            log.exception("could not warm %s", model_id)
            continue
        log.info("warm %s in %.1f s", model_id, time.perf_counter() - t0)


def run_worker(
    settings: Settings | None = None,
    burst: bool = False,
    max_jobs: int | None = None,
    metrics_port: int | None = None,
    warm: tuple[str, ...] | None = None,
) -> None:
    settings = settings or Settings()
    threads = os.environ.get("BACKTRACE_TORCH_THREADS")
    if threads:  # one thread per worker process is faster for small models on shared CPUs
        import torch

        torch.set_num_threads(int(threads))
    from engine import tune_allocator

    tune_allocator()  # a serving process: keep freed tensor memory for the next job
    name = store.worker_id()
    st = init_worker(settings, name)
    m.declare((s.id, s.task) for s in st.registry.models.values())
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        start_http_server(port)
    # Explicit list (--no-warm gives none) > BACKTRACE_WARM_MODELS > the registry's flags.
    if warm is not None:
        wanted = list(warm)
    elif settings.warm_models:
        wanted = list(settings.warm_models)
    else:
        wanted = [s.id for s in st.registry.models.values() if s.warm]
    _warm(st.registry, wanted)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(settings, name, stop), daemon=True)
    beat.start()
    r = store.connect(settings.redis_url, patient=True)
    queue = Queue(settings.queue, connection=r, serializer=JSONSerializer)
    worker = Worker(
        [queue],
        connection=r,
        serializer=JSONSerializer,
        name=name,
        # Find jobs abandoned by a dead worker within minutes, not the default 10.
        maintenance_interval=60,
    )
    try:
        worker.work(burst=burst, max_jobs=max_jobs, logging_level="INFO")
    finally:
        stop.set()
        beat.join(timeout=10)
