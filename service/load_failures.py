"""Models that did not load, as the workers that tried report them, for ``GET /models``: a
model whose weights file is broken was shown like any model not loaded yet, and its failure
was only in a worker's log and in the jobs it failed. A worker that fails to load a model
(warming it, or for a job) writes why under the model's key; the next worker that loads it
deletes the key. A report expires after ``TTL_S`` all the same: nothing retries a model in
the background, and a fixed file should not be reported broken for good. No torch: the API
reads these."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

LOAD_FAILURE = "bt:load-failure:{}"
TTL_S = 24 * 3600


def report(r: redis.Redis, model_id: str, worker: str, message: str) -> None:
    """Worker side: ``worker`` could not load ``model_id``, for ``message``."""
    value = json.dumps({"message": message, "worker": worker, "at": time.time()})
    r.set(LOAD_FAILURE.format(model_id), value, ex=TTL_S)


def clear(r: redis.Redis, model_id: str) -> None:
    """Worker side: ``model_id`` loaded."""
    r.delete(LOAD_FAILURE.format(model_id))


def read(r: redis.Redis, model_ids: list[str]) -> dict[str, dict[str, Any]]:
    """API side: the reports of these models that have one (one round trip); a value that is
    not what workers write is left out."""
    values = r.mget([LOAD_FAILURE.format(m) for m in model_ids]) if model_ids else []
    reports = {}
    for model_id, raw in zip(model_ids, values, strict=True):
        try:
            report = json.loads(raw) if raw else None
        except ValueError:
            continue
        if _well_formed(report):
            reports[model_id] = report
    return reports


def _well_formed(report: Any) -> bool:
    """Whether ``report`` is what ``report`` writes (``schemas.LoadFailure``)."""
    if not isinstance(report, dict):
        return False
    texts = isinstance(report.get("message"), str) and isinstance(report.get("worker"), str)
    at = report.get("at")
    return texts and isinstance(at, int | float) and not isinstance(at, bool)
