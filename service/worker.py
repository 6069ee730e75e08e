"""An RQ ``SimpleWorker`` with a warm model cache, a heartbeat and its own /metrics.

``SimpleWorker`` runs jobs in this process (no fork per job), which is what keeps models and
captured graphs warm and makes CUDA usable; one such process per GPU. Recycle it with
``max_jobs`` under a supervisor to bound memory growth."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer

from . import heap, reaper, store, worker_http
from . import worker_metrics as m
from .config import Settings
from .models import DeviceUnavailable, EntryError, ModelLoadError
from .registry import Registry
from .vocabulary import WorkerExit, WorkerStatus
from .work import run
from .work.context import JobCanceled, WorkerState, init_worker, leave_handed_on

log = logging.getLogger("service.worker")


class Worker(SimpleWorker):
    """RQ's ``SimpleWorker`` with fewer heartbeats. RQ refreshes its worker key three times
    per job, three Redis round trips each, for a key that lives ``worker_ttl`` + 60 s (8
    minutes by default): a third of a small job's round trips. Here a heartbeat outside a
    pipeline is sent only when the last one is older than ``HEARTBEAT_EVERY_S``. Liveness
    that matters (a dead worker's jobs) comes from our own heartbeat thread anyway."""

    HEARTBEAT_EVERY_S = 10.0
    executed = 0  # jobs this process ran (RQ keeps its own count to itself)
    stop_asked = False  # SIGTERM or SIGINT came (RQ marks it only when a job is running)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.executed += 1
        super().execute_job(job, queue)

    def quit_cleanly(self, burst: bool, max_jobs: int | None) -> bool:
        """Whether RQ's loop ended as asked (a stop signal, a burst's empty queue, its
        ``max_jobs``) rather than on an error: RQ logs an unhandled error ("quitting") and
        returns as from a stop, and a worker that then exits 0 is restarted at once, with
        no backoff, however often it fails the same way."""
        done = max_jobs is not None and self.executed >= max_jobs
        return burst or done or self.stop_asked

    def handle_warm_shutdown_request(self) -> None:
        self.stop_asked = True
        super().handle_warm_shutdown_request()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        last = self.last_heartbeat
        if pipeline is None and last is not None:
            if (datetime.now(UTC) - last).total_seconds() < self.HEARTBEAT_EVERY_S:
                return
        super().heartbeat(timeout, pipeline)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        if EARLY_STOP.signum is None:
            return
        # It came during RQ's bootstrap: stop before the first dequeue. RQ's request_stop
        # raises StopRequested when idle, which only its loop catches, and this runs before
        # the loop: the flag it checks first instead.
        try:
            self.request_stop(EARLY_STOP.signum, None)
        except StopRequested:
            self._stop_requested = True

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A job canceled by request is logged in one line: it is an ending a client asked
        for, not an error with a traceback worth reading."""
        if isinstance(exc_info[1], JobCanceled):
            self.log.info("Worker %s: job %s canceled by request", self.name, job.id)
            return
        super().handle_exception(job, *exc_info)


class Heartbeat:
    """Our own liveness key (``store.WORKER``), refreshed three times per TTL from a thread
    from the moment the worker starts: ``warming`` (with the model being warmed, its place
    and the count) while it loads and captures its warm models, then ``ready``. Without the
    warming beats a warming worker looked like no worker at all. RQ's SimpleWorker sends no
    heartbeat while a job runs, and a killed worker stays registered for minutes. Each beat
    also keeps the published node names of the models it holds from expiring, and ends the
    jobs of workers whose key has expired (``service.reaper``)."""

    def __init__(self, settings: Settings, st: WorkerState):
        self.settings, self.st = settings, st
        self.status = WorkerStatus.WARMING
        self.warming: dict[str, Any] | None = None
        self._wake = threading.Event()  # a beat now: the status changed, or stop
        self._stopping = False
        self._last_ok = time.monotonic()  # a worker starting counts as beating (see silent_s)
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def warming_model(self, model_id: str, index: int, total: int) -> None:
        self.warming = {"model": model_id, "index": index, "total": total}
        self._wake.set()

    def ready(self) -> None:
        self.status, self.warming = WorkerStatus.READY, None
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def silent_s(self) -> float:
        """Seconds since the last successful beat (since start before the first), what
        ``/livez`` reads: it grows when Redis is unreachable, when a beat hangs and when
        this thread has died, which the process's /metrics port could not tell."""
        return time.monotonic() - self._last_ok

    def info(self) -> dict[str, Any]:
        info = {
            "name": self.st.name,
            "pid": os.getpid(),
            "queue": self.settings.queue,
            "status": self.status,
            "models": self.st.cache.warm_ids() if self.status == WorkerStatus.READY else [],
        }
        if self.warming is not None:
            info["warming"] = self.warming
        return info

    def _run(self) -> None:
        s = self.settings
        r = store.connect(s.redis_url, patient=True)
        failing = False  # logged once when beats start failing, once when they recover
        while not self._stopping:
            self._wake.clear()
            try:
                info = self.info()
                store.heartbeat(r, self.st.name, info, s.heartbeat_ttl)
                store.keep_graphs(r, info["models"])
                reaper.reap(r, s.queue, s.heartbeat_ttl, s.result_ttl, s.failure_ttl)
                stuck, lost = r.mget(reaper.STUCK.format(self.st.name), self.st.fence)
            except Exception as exc:  # noqa: BLE001 - Redis blips must not kill the worker
                if not failing:  # Redis's own error says it all in a line; others, a traceback
                    log.warning(
                        "heartbeat failed (%s); retrying quietly until it works",
                        exc,
                        exc_info=not isinstance(exc, redis.RedisError),
                    )
                failing, stuck, lost = True, None, None
            else:
                if failing:
                    log.info("heartbeat works again")
                failing, self._last_ok = False, time.monotonic()
            if stuck is not None:
                self._exit_stuck(stuck.decode(errors="replace"))
            if lost is not None:  # stopped past its heartbeat, then resumed
                leave_handed_on(self.st.name)
            self._wake.wait(s.heartbeat_ttl / 3)
        r.delete(store.WORKER.format(self.st.name))

    def _exit_stuck(self, why: str) -> None:
        """The reaper failed this worker's job past its timeout: the main thread is stuck
        where no signal reaches it. Leave at once, with ``WorkerExit.STUCK``, so that whatever
        runs the worker (the supervisor, or Kubernetes, which has no other way to tell)
        starts a fresh one."""
        log.error("stuck in a job (%s): exiting so that a fresh worker takes over", why)
        logging.shutdown()
        os._exit(WorkerExit.STUCK)


class EarlyStop:
    """SIGTERM or SIGINT before RQ's loop installs its own handlers (a rolling update or a
    scale-down while the worker warms) is no failure: no job is held. While models warm the
    process leaves at once with 0; from ``ready`` on the signal is kept, and RQ's loop stops
    at its first turn (``Worker._install_signal_handlers``), with its goodbye to Redis.
    Without it the default action killed the worker (-15), so that a stop between ``ready``
    and RQ's bootstrap read as a crash."""

    signum: int | None = None
    warming = True

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.warming:
            log.info("stopped while warming (%s)", signal.Signals(signum).name)
            raise SystemExit(0)


EARLY_STOP = EarlyStop()


def _warm(registry: Registry, wanted: list[str], beat: Heartbeat) -> None:
    """Load, capture and run once each wanted model, with a log line and a heartbeat per
    model, before the worker takes jobs: /readyz counts a worker only once it serves every
    warm model without a capture (the cache publishes each captured graph's node names, as
    for any capture: ``service.models``). A model that cannot warm is logged and left to
    load on first use."""
    ids = list(dict.fromkeys(wanted))
    for i, model_id in enumerate(ids, 1):
        spec = registry.get(model_id)
        if spec is None:
            log.warning("cannot warm %s: not in the registry", model_id)
            continue
        log.info("warming %s (%d of %d)", model_id, i, len(ids))
        beat.warming_model(model_id, i, len(ids))
        t0 = time.perf_counter()
        try:
            run.warm(spec)
        except (DeviceUnavailable, EntryError, ModelLoadError) as exc:
            # the configuration's error, or the files': one line that names them, no traceback
            log.error("could not warm %s: %s", model_id, exc)
            continue
        except Exception:  # noqa: BLE001 - a broken entry must not stop the others
            log.exception("could not warm %s", model_id)
            continue
        log.info("warm %s in %.1f s", model_id, time.perf_counter() - t0)


def _report_missing_files(st: WorkerState) -> None:
    """Log each registry entry whose folder or weights file is not on this machine, and
    report it as a load failure (``GET /models`` shows it): a mistyped path was found only
    by the model's first job. The worker still serves the other models."""
    for spec in st.registry.models.values():
        if (why := st.registry.missing_files(spec)) is not None:
            log.error("%s", why)
            if st.reports is not None:
                st.reports.load_failed(spec.id, st.name, FileNotFoundError(why))


def run_worker(
    settings: Settings | None = None,
    burst: bool = False,
    max_jobs: int | None = None,
    metrics_port: int | None = None,
    warm: tuple[str, ...] | None = None,
) -> None:
    settings = settings or Settings()
    if settings.torch_threads:  # one per worker process is faster for small models on shared CPUs
        import torch

        torch.set_num_threads(settings.torch_threads)
    from engine import tune_allocator

    tune_allocator()  # a serving process: keep freed tensor memory for the next job
    st = init_worker(settings, store.worker_id())
    m.declare((s.id, s.task) for s in st.registry.models.values())
    _report_missing_files(st)
    port = settings.metrics_port if metrics_port is None else metrics_port
    beat = Heartbeat(settings, st)
    if port:  # before the heartbeat: a taken port leaves no warming key
        try:
            worker_http.start(port, beat.silent_s, settings.heartbeat_ttl)
        except OSError as exc:  # a taken port was a traceback, then the same at each restart
            sys.exit(
                f"worker: cannot serve /metrics and /livez on port {port}: {exc.strerror}; "
                "set WORKER_METRICS_PORT or --metrics-port to a free port, or 0 for none"
            )
    EARLY_STOP.install()  # before the first beat: a stop from now on is an orderly one
    beat.start()  # warming: the job view and /readyz say so from now on
    # Explicit list (--no-warm gives none) > BACKTRACE_WARM_MODELS > the registry's flags.
    if warm is not None:
        wanted = list(warm)
    elif settings.warm_models:
        wanted = list(settings.warm_models)
    else:
        wanted = [s.id for s in st.registry.models.values() if s.warm]
    try:
        _warm(st.registry, wanted, beat)
        EARLY_STOP.warming = False
        worker = _rq_worker(settings, st.name)
        heap.settle()  # what warming captured and ran stays: out of the collector's walks
        beat.ready()
        worker.work(burst=burst, max_jobs=max_jobs, logging_level="INFO")
    except redis.RedisError as exc:  # RQ's own goodbye failed too (Redis refuses writes)
        log.error("RQ's loop ended on a Redis error (%s): exiting to be restarted", exc)
        sys.exit(WorkerExit.TEMPFAIL)
    finally:
        beat.stop()
    if not worker.quit_cleanly(burst, max_jobs):
        log.error("RQ's loop quit on an error (logged above): exiting to be restarted")
        sys.exit(WorkerExit.TEMPFAIL)


def _rq_worker(settings: Settings, name: str) -> Worker:
    r = store.connect(settings.redis_url, patient=True)
    return Worker(
        [Queue(settings.queue, connection=r, serializer=JSONSerializer)],
        connection=r,
        serializer=JSONSerializer,
        name=name,
        # Find jobs abandoned by a dead worker within minutes, not the default 10.
        maintenance_interval=60,
    )
