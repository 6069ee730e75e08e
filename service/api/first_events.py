"""The ``queued`` event of the jobs this API process has just accepted, so that their event
streams start without reading Redis.

A client that POSTs a job and then follows it (GET /jobs/{id}/events, most often on the same
keep-alive connection, so the same process) had its stream start with a read of the job's
Redis stream: one round trip, about a sixth of the API's Redis work per job, for the one
event this process itself wrote a moment before (``enqueue`` returns it). A job is kept for
``KEEP_S`` and given out once; a stream of a job that is not kept (accepted by another API
process, a reconnect, an older job) reads Redis as before."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from .. import store

# Long enough for a client's GET after its POST, short enough that a kept job's stream is in
# Redis whatever its settings (a stream lives the job's timeout and a result's lifetime).
KEEP_S = 60.0
SIZE = 4096  # jobs kept at most: the oldest go first

# A Redis stream entry as redis-py gives it: its id and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


class FirstEvents:
    """The first event of each job accepted here in the last ``KEEP_S`` seconds, by job id."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, tuple[float, Entry]] = OrderedDict()

    def add(self, job_id: str, entry: Entry) -> None:
        now = time.monotonic()
        self._jobs[job_id] = (now + KEEP_S, entry)
        while self._jobs and (len(self._jobs) > SIZE or next(iter(self._jobs.values()))[0] < now):
            self._jobs.popitem(last=False)

    def take(self, job_id: str) -> Any:
        """The job's first event as an XREAD of its stream replies (``EventStreams.peek``),
        or None when it is not kept; a job is given out once."""
        kept = self._jobs.pop(job_id, None)
        if kept is None or kept[0] < time.monotonic():
            return None
        return [[store.EVENTS.format(job_id).encode(), [kept[1]]]]
