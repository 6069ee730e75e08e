"""The service's vocabulary, defined once: job statuses and stream event names. No torch."""

from __future__ import annotations

from enum import StrEnum


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
