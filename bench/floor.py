"""The floor for ``bench.service``: the bare path a job needs, with nothing of ours in it.

A uvicorn + FastAPI process whose ``POST /run_task`` pushes the job onto a Redis list and
answers 202 with its id, one consumer process that pops it and appends a ``done`` entry to
the job's Redis stream, and ``GET /jobs/{id}/events`` relaying that entry as server-sent
events (a POST with ``Accept: text/event-stream`` relays it in its own response). Same server
settings as ``python -m service serve``, same Redis clients (redis.asyncio in the API, redis in
the consumer), same wire format, so ``bench.service``'s clients time it unchanged. Absolute
milliseconds do not carry across machines; our overhead divided by this one's does."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import redis
import redis.asyncio as aredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

QUEUE = "floor:queue"
EVENTS = "floor:events:{}"
# What the service's ``done`` carries that the bench reads: no engine, no queue wait measured.
DONE = json.dumps({"timings": {"engine_s": 0.0, "queue_wait_s": 0.0}})
ROOT = Path(__file__).resolve().parents[1]


def create_app(redis_url: str) -> FastAPI:
    """The floor's API: enqueue and relay, nothing else (no validation, no job document)."""
    app = FastAPI()
    ar = aredis.Redis.from_url(redis_url)

    async def relay(job_id: str) -> AsyncIterator[bytes]:
        last = "0-0"
        while True:
            # Blocks under redis-py's default 5 s socket timeout, like the service's reads.
            resp = await ar.xread({EVENTS.format(job_id): last}, block=1000, count=100)
            for entry_id, fields in resp[0][1] if resp else ():
                last = entry_id
                yield b"event: %s\ndata: %s\n\n" % (fields[b"event"], fields[b"data"])
                if fields[b"event"] == b"done":
                    return

    def events(job_id: str) -> StreamingResponse:
        return StreamingResponse(relay(job_id), media_type="text/event-stream")

    @app.post("/run_task")
    async def run_task(request: Request):
        job_id = uuid.uuid4().hex
        await ar.lpush(QUEUE, job_id.encode() + b" " + await request.body())
        if "text/event-stream" in request.headers.get("accept", ""):
            return events(job_id)
        return JSONResponse({"job_id": job_id}, status_code=202)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ok"}

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        return events(job_id)

    return app


def consume(redis_url: str) -> None:
    """Pop each job and end it at once: one ``done`` entry on its stream."""
    r = redis.Redis.from_url(redis_url)
    while True:
        popped = r.brpop([QUEUE], timeout=1)  # under redis-py's 5 s socket timeout
        if popped is None:
            continue
        job_id = popped[1].split(b" ", 1)[0].decode()
        r.xadd(EVENTS.format(job_id), {"event": "done", "data": DONE})


def start(redis_url: str, port: int) -> list[subprocess.Popen]:
    """The floor's consumer and API as child processes (the API last)."""
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    cmds = [["consumer"], ["api", "--port", str(port)]]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "bench.floor", *cmd],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for cmd in cmds
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("role", choices=["api", "consumer"])
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args(argv)
    redis_url = os.environ["REDIS_URL"]
    if a.role == "consumer":
        consume(redis_url)
        return
    import uvicorn

    # As ``python -m service serve`` runs the API: same loop, parser and logging.
    app = create_app(redis_url)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
