"""The service's vocabulary, defined once: job statuses, stream event names, what a
worker's heartbeat says it is doing and how a worker exits. No torch."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class JobStatus(StrEnum):
    """A job's status as the API reports it (RQ's own statuses map onto these)."""

    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED)


class Event(StrEnum):
    """Names of the entries of a job's event stream (and of its SSE events)."""

    QUEUED = "queued"
    STARTED = "started"
    RETRYING = "retrying"
    PROMPT = "prompt"
    TOKEN = "token"
    RELEVANCE = "relevance"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_EVENTS


TERMINAL_EVENTS = (Event.DONE, Event.ERROR, Event.CANCELED)
# A job's lifecycle before it has any output: an SSE relay may hold these back briefly to
# send them with what follows (``service.api.sse``); progress (tokens, relevance) is not held.
LIFECYCLE_EVENTS = (Event.QUEUED, Event.STARTED, Event.RETRYING)


class WorkerStatus(StrEnum):
    """What a worker's heartbeat (``store.WORKER``) says it is doing. ``warming``: loading
    and capturing the models it warms, not yet taking jobs (/readyz does not count it);
    ``ready``: taking jobs. A heartbeat without a status is from a worker that predates
    warming heartbeats, which beat only once ready."""

    WARMING = "warming"
    READY = "ready"


# The image formats a request may send (Pillow's names), checked at the door and the only
# ones the worker decodes.
IMAGE_FORMATS = ("PNG", "JPEG")


class WorkerExit(IntEnum):
    """A worker's exit status when it leaves by itself, as sysexits.h names them; 0 is a
    stop it was asked for (a signal, ``--burst``, ``--max-jobs``). Both ask whatever runs
    it (the supervisor, Kubernetes) for a fresh worker, the second after a growing delay."""

    LOST = 69  # EX_UNAVAILABLE: it was stopped so long that its jobs were handed on
    STUCK = 70  # EX_SOFTWARE: it left a job stuck where no signal reaches
    TEMPFAIL = 75  # EX_TEMPFAIL: it cannot go on for now (Redis full, RQ's loop failed)
