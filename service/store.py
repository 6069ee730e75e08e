"""Redis keys and the few operations on them that the API and the workers share.

Per job: an RQ job (status, timings), a stream of events ``bt:events:<id>`` (``XADD`` with an
approximate MAXLEN and an EXPIRE, so every reader sees every entry and can resume from an
entry id), the final document ``bt:result:<id>`` and a cancel flag ``bt:cancel:<id>``.
Per worker: a heartbeat key with its status (warming or ready) and the models it holds warm.
Per model: the node names of its captured graph, once a worker has captured it. Per
Idempotency-Key (hashed with the caller's API key): the first request's fingerprint and
response. No torch here."""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from .vocabulary import TERMINAL_EVENTS, Event, WorkerStatus

EVENTS = "bt:events:{}"
RESULT = "bt:result:{}"
CANCEL = "bt:cancel:{}"
WORKER = "bt:worker:{}"
# A worker whose jobs the reaper handed on (its heartbeat had stopped): why, by worker name.
# Its writes to a job's stream are refused from then on (``fence``).
LOST = "bt:lost:{}"
IDEMPOTENCY = "bt:idem:{}"
GRAPH = "bt:graph:{}"
GRAPH_TTL_S = 24 * 3600
# Commands on these are queued, not sent: the API enqueues on the async client's pipeline.
PIPELINES = (redis.client.Pipeline, redis.asyncio.client.Pipeline)
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps(value: Any, sort_keys: bool = False) -> bytes:
    """JSON as the service writes it to Redis: orjson, about ten times faster than ``json``
    for a result document (the worker's result writes took a third of the cProfile time
    they took with ``json``); NaN and infinities become ``null``, as JSON has no others
    (``json`` wrote ``NaN``, which browsers' ``JSON.parse`` refuses); numpy values as their
    numbers. An integer past 64 bits, which orjson refuses and JSON allows (a token id the
    API could not check against an unknown vocabulary), is written by ``json``."""
    option = _JSON_OPTIONS | orjson.OPT_SORT_KEYS if sort_keys else _JSON_OPTIONS
    try:
        return orjson.dumps(value, option=option)
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=sort_keys).encode()


# TCP keep-alive probes after 30 s of silence, 3 of them 10 s apart: a connection whose Redis
# vanished without closing it (its node lost, a failover to a new address) fails within about
# a minute. Without them a read with no timeout (RQ's dequeue, an SSE reader's wait) waited
# on it for good: a worker blocked while its heartbeat said nothing, for the kernel's two
# hours. Linux's names; elsewhere the system's defaults.
_PROBES = ("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)
KEEPALIVE = {getattr(socket, name): v for name, v in _PROBES if hasattr(socket, name)}


def tcp_options(url: str) -> dict[str, Any]:
    """Client settings for a Redis URL: keep-alive probes where it is TCP (a Unix socket
    takes none)."""
    if not url.startswith(("redis://", "rediss://")):
        return {}
    return {"socket_keepalive": True, "socket_keepalive_options": KEEPALIVE}


def connect(url: str, patient: bool = False) -> redis.Redis:
    """A client for ``url``. ``patient`` (the workers) retries a lost connection for about
    25 s, so that a running job and RQ's bookkeeping ride out a Redis restart; the API fails
    fast instead and answers 503 with Retry-After."""
    retry = Retry(ExponentialBackoff(cap=2, base=0.1), 15) if patient else None
    kw: dict[str, Any] = {"retry": retry} if retry else {}
    kw.update(tcp_options(url))
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, **kw)


# Append an event unless it already is the stream's last entry, and push the expiry out, in
# one atomic step (with the final document too, when KEYS[2] is given). A worker's client
# retries a write whose reply was lost while Redis restarted; this keeps the retry from
# writing the event twice. With KEYS[3] (a job's cancel flag) and a second event, data and
# document in ARGV[6..8]: that second ending is written instead when the flag is set, and
# the reply says which (1: the second), so a cancel asked while the job ran costs no read
# of its own before the result is stored. A retry finds the ending already written (the
# stream's last event is one of the two) and changes nothing: a cancel that came between
# the two tries must not turn a ``done`` the clients have seen into ``canceled``. The first
# ending stands: once the stream's last event ends the job, nothing more is written, neither
# event nor document (a worker that outlived its job, whose clients were told it ended
# failed, must not append tokens and a ``done`` after that ``error``).
_ENDED = " or ".join(f"last[2][2] == '{e}'" for e in TERMINAL_EVENTS)
_APPEND = Script(
    None,
    f"""
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if KEYS[3] and last and (last[2][2] == ARGV[1] or last[2][2] == ARGV[6]) then
  return last[2][2] == ARGV[6] and 1 or 0  -- a retry of a write that ended the job
end
if last and ({_ENDED}) then
  if KEYS[3] then return 0 end
  return last[1]
end
local event, data, doc, second = ARGV[1], ARGV[2], ARGV[5], 0
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  event, data, doc, second = ARGV[6], ARGV[7], ARGV[8], 1
end
if KEYS[2] then redis.call('SET', KEYS[2], doc, 'EX', ARGV[4]) end
local id
if last and last[2][2] == event and last[2][4] == data then
  id = last[1]
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', event, 'data', data)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if KEYS[3] then return second end
return id
""".encode(),
)
# ``_APPEND`` behind a fence (its first key, the writer's ``LOST`` mark): nothing is written,
# and the reply is nil, once the reaper has handed the writer's jobs on. A worker that was
# stopped (SIGSTOP, a VM paused) past its heartbeat and then resumed went on writing tokens
# and its ending to a job that another worker was running again: the two runs' tokens
# interleaved in one stream, and the stale run's ``done`` could end it.
_FENCED = Script(
    None,
    b"if redis.call('EXISTS', KEYS[1]) == 1 then return false end\n"
    b"local KEYS = {unpack(KEYS, 2)}\n" + _APPEND.script,
)


def fence(worker: str) -> str:
    """The key that fences ``worker``'s writes (``LOST``), for ``fence=`` of the writes."""
    return LOST.format(worker)


def _append(
    r: redis.Redis | redis.client.Pipeline,
    keys: list[str],
    args: list[Any],
    fenced_by: str | None = None,
) -> Any:
    """Run ``_APPEND`` (``_FENCED`` behind the key ``fenced_by``). On a pipeline as EVAL with
    the script's text: redis-py checks a pipeline's EVALSHA scripts with an extra SCRIPT
    EXISTS round trip per execute, and EVAL of a cached script costs Redis only a hash of
    its text."""
    script = _APPEND if fenced_by is None else _FENCED
    keys = keys if fenced_by is None else [fenced_by, *keys]
    if isinstance(r, PIPELINES):
        return r.eval(script.script, len(keys), *keys, *args)
    return script(keys, args, r)


def add_event(
    r: redis.Redis | redis.client.Pipeline,
    job_id: str,
    event: Event,
    data: dict[str, Any] | bytes,
    ttl: int,
    maxlen: int = 10000,
    fence: str | None = None,
) -> str | None:
    """Append one event to the job's stream and push its expiry out; returns the entry id
    (None on a pipeline: the id is then in the pipeline's results, nil there when ``fence``
    refused it). ``data`` as bytes is its JSON already encoded (``dumps``), for a caller
    that also counts its size."""
    payload = data if isinstance(data, bytes) else dumps(data)
    entry_id = _append(r, [EVENTS.format(job_id)], [event, payload, maxlen, ttl], fence)
    if isinstance(r, PIPELINES):
        return None
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def start(
    r: redis.Redis,
    jobs: list[tuple[str, dict[str, Any]]],
    ttl: int,
    maxlen: int = 10000,
    fence: str | None = None,
) -> list[bool] | None:
    """The worker's first write for each job it took from RQ (jobs claimed for a batch get
    theirs from the claim: ``service.batching``): a ``started`` event, and whether cancel
    was asked, all in one round trip; None when ``fence`` refused the writes."""
    pipe = r.pipeline(transaction=False)
    for job_id, data in jobs:
        pipe.exists(CANCEL.format(job_id))
        args = [Event.STARTED, dumps(data), maxlen, ttl]
        _append(pipe, [EVENTS.format(job_id)], args, fence)
    replies = pipe.execute()  # an empty pipeline sends nothing
    if any(x is None for x in replies[1::2]):
        return None
    return [bool(x) for x in replies[::2]]


@dataclass(frozen=True)
class Ending:
    """How a job ends in Redis: its terminal event, that event's data, its final document."""

    event: Event
    data: dict[str, Any]
    doc: dict[str, Any]

    def encoded(self) -> list[str | bytes]:
        return [self.event, dumps(self.data), dumps(self.doc)]


def finish(
    r: redis.Redis | redis.client.Pipeline,
    job_id: str,
    ending: Ending,
    ttl: int,
    maxlen: int = 10000,
    if_canceled: Ending | None = None,
    fence: str | None = None,
) -> int:
    """Store the final document and append the terminal event together, atomically, so a
    stream reader that sees ``done`` can always read the result (on a pipeline, when it is
    executed). With ``if_canceled``, that ending is written instead when a cancel was asked
    meanwhile, and the script's reply (1) says so; behind ``fence`` a nil reply says that
    nothing was written. Returns the size of ``ending``'s event data and document, the bytes
    written unless the other ending was."""
    event, payload, raw = ending.encoded()
    keys, args = [EVENTS.format(job_id), RESULT.format(job_id)], [event, payload, maxlen, ttl, raw]
    if if_canceled is not None:
        keys.append(CANCEL.format(job_id))
        args += if_canceled.encoded()
    _append(r, keys, args, fence)
    return len(raw) + len(payload)


def get_result(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The job's final document; None when there is none, or when the value is not the JSON
    the service writes (only ever parsed as JSON, never unpickled)."""
    raw = r.get(RESULT.format(job_id))
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "status" in doc else None


def request_cancel(r: redis.Redis, job_id: str, ttl: int) -> None:
    r.set(CANCEL.format(job_id), "1", ex=ttl)


def worker_id() -> str:
    """host.pid (for people) and a random part: a container restarted in place has the same
    hostname and PID 1, and under the same name RQ refuses to start it until the dead
    worker's registration expires, and the dead worker's jobs would look alive."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def heartbeat(r: redis.Redis, name: str, info: dict[str, Any], ttl: int = 15) -> None:
    r.set(WORKER.format(name), json.dumps(info), ex=ttl)


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    """Workers whose heartbeat has not expired, warming or ready (``is_ready``). RQ's own
    worker keys outlive a killed SimpleWorker by minutes (no heartbeat during a job), so
    readiness uses ours."""
    keys = list(r.scan_iter(match=WORKER.format("*"), count=100))
    if not keys:
        return []
    return decode_workers(r.mget(keys))


def decode_workers(values: list[bytes | None]) -> list[dict[str, Any]]:
    """The heartbeats among raw values of worker keys (a key that expired between the scan
    and the read is None)."""
    return [json.loads(v) for v in values if v]


def is_ready(info: dict[str, Any]) -> bool:
    """Whether a heartbeat is from a worker that takes jobs (not one still warming)."""
    return info.get("status", WorkerStatus.READY) == WorkerStatus.READY


def publish_graph(
    r: redis.Redis,
    model_id: str,
    revision: str,
    nodes: list[str],
    signature: dict[str, Any] | None = None,
) -> None:
    """The node names of a model's captured graph, for the API to check
    ``output.relevance`` at the door, and its signature (``service.models.graph_signature``)
    for the checks of inputs and classes where the API knows no more. A worker that
    captures the model again overwrites them; they expire after ``GRAPH_TTL_S`` all the
    same, so that names of a revision no worker serves any more (new weights, a changed
    registry entry) do not refuse layers for good: without them the API lets the names
    through and the worker checks them on the graph it runs."""
    value = json.dumps({"revision": revision, "nodes": nodes, "signature": signature})
    r.set(GRAPH.format(model_id), value, ex=GRAPH_TTL_S)


def keep_graphs(r: redis.Redis, model_ids: list[str]) -> None:
    """Push out the expiry of the published node names of the models a worker holds (from
    its heartbeat): a model captured once and kept warm is not captured again, and its
    names must not expire while it is served."""
    if not model_ids:
        return
    pipe = r.pipeline(transaction=False)
    for model_id in model_ids:
        pipe.expire(GRAPH.format(model_id), GRAPH_TTL_S)
    pipe.execute()
