"""``python -m bench.load``: drive a running service on loopback with concurrent clients for a
bounded time and job count; prints JSON.

Each client submits a mix of text classification, image classification and generation jobs
(generation and every fourth classification followed over SSE, the rest by polling) and
waits for each to end before the next. A job is *lost* when it was accepted (202) but was not
seen finished or failed by the end, after a drain period for the ones still running; an
*error* is an unexpected HTTP answer, a transport error or a job that ended failed. 429s are
back-pressure: the client waits Retry-After and tries again (counted as ``throttled``).

The default is the target of issue 7: 16 clients for 2 minutes, zero errors, zero lost."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

TERMINAL = ("finished", "failed", "canceled")
END_EVENTS = {"done": "finished", "error": "failed", "canceled": "canceled"}


@dataclass
class Tally:
    requests: int = 0
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    throttled: int = 0
    http_errors: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)


def loopback_only(url: str) -> str:
    """This tool generates load: it refuses any host but this machine."""
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"bench.load only targets loopback, not {host!r}")
    return url.rstrip("/")


def bodies(models: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, request body) for each kind the service's registry offers."""
    from PIL import Image

    out = []
    texts = [m for m, t in models.items() if t == "text-classification"]
    images = [m for m, t in models.items() if t == "image-classification"]
    gens = [m for m, t in models.items() if t == "generation"]
    if texts:
        out.append(("text", {"model": texts[0], "inputs": {"text": "a wonderful, moving film"}}))
    if images:
        buf = io.BytesIO()
        Image.effect_noise((16, 16), 64).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        out.append(("image", {"model": images[0], "inputs": {"image": image}}))
    if gens:
        lookup = "tiny-lookup-lm" if "tiny-lookup-lm" in gens else gens[0]
        body = {
            "model": lookup,
            "inputs": {"text": "a3 c1 f9 h0 ? f"},
            "generation": {"max_new_tokens": 4},
        }
        out.append(("generation", body))
    if not out:
        raise SystemExit("the service's registry has no model of a known task")
    return out


async def submit(http: httpx.AsyncClient, body: dict[str, Any], tally: Tally) -> str | None:
    while True:
        tally.requests += 1
        resp = await http.post("/run_task", json=body)
        if resp.status_code == 202:
            tally.submitted += 1
            return resp.json()["job_id"]
        if resp.status_code == 429:
            tally.throttled += 1
            await asyncio.sleep(float(resp.headers.get("retry-after", 1)))
            continue
        tally.http_errors.append(f"POST /run_task {resp.status_code}: {resp.text[:200]}")
        return None


async def follow_sse(http: httpx.AsyncClient, job_id: str, tally: Tally) -> str:
    """The job's end as its stream tells it (resuming with Last-Event-ID if cut)."""
    last = None
    while True:
        tally.requests += 1
        headers = {"Last-Event-ID": last} if last else {}
        async with http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as resp:
            if resp.status_code != 200:
                tally.http_errors.append(f"GET events {resp.status_code}")
                return "error"
            event = ""
            async for line in resp.aiter_lines():
                if line.startswith("id:"):
                    last = line[3:].strip()
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line == "" and event in END_EVENTS:
                    return END_EVENTS[event]


async def follow_poll(http: httpx.AsyncClient, job_id: str, tally: Tally) -> str:
    while True:
        tally.requests += 1
        resp = await http.get(f"/jobs/{job_id}")
        if resp.status_code != 200:
            tally.http_errors.append(f"GET /jobs/{{id}} {resp.status_code}")
            return "error"
        status = resp.json()["status"]
        if status in TERMINAL:
            return status
        await asyncio.sleep(0.1)


async def client(
    http: httpx.AsyncClient,
    mix: list,
    tally: Tally,
    stop_at: float,
    budget: list[int],
    seed: int,
    job_timeout: float,
) -> None:
    """One client: submit, follow to the end (or give up after job_timeout: the job stays
    pending, to be drained or counted lost), repeat until the time or the budget is spent."""
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        kind, body = rng.choice(mix)
        t0 = time.perf_counter()
        try:
            job_id = await submit(http, body, tally)
            if job_id is None:
                continue
            tally.pending.add(job_id)
            streamed = kind == "generation" or n % 4 == 0
            follow = follow_sse if streamed else follow_poll
            status = await asyncio.wait_for(follow(http, job_id, tally), job_timeout)
        except TimeoutError:
            continue
        except httpx.HTTPError as exc:
            tally.http_errors.append(f"{type(exc).__name__}: {exc}")
            continue
        n += 1
        if status in TERMINAL:
            tally.pending.discard(job_id)
        if status == "finished":
            tally.finished += 1
            tally.latency.setdefault(kind, []).append(time.perf_counter() - t0)
        elif status in ("failed", "canceled"):
            tally.failed += 1


async def drain(http: httpx.AsyncClient, tally: Tally, timeout: float) -> None:
    """Jobs whose client gave up on them (transport errors, job timeout): wait for them to
    end, up to ``timeout``; the rest are lost."""
    deadline = time.monotonic() + timeout
    while tally.pending and time.monotonic() < deadline:
        for job_id in list(tally.pending):
            resp = await http.get(f"/jobs/{job_id}")
            status = resp.json().get("status") if resp.status_code == 200 else None
            if status in TERMINAL:
                tally.pending.discard(job_id)
                tally.finished += status == "finished"
                tally.failed += status != "finished"
        await asyncio.sleep(0.5)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))], 4)


async def run(
    url: str, concurrency: int, duration: float, max_jobs: int, job_timeout: float, drain_s: float
) -> dict[str, Any]:
    timeout = httpx.Timeout(30, read=120)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        models = {m["id"]: m["task"] for m in (await http.get("/models")).json()["models"]}
        mix, tally = bodies(models), Tally()
        t0 = time.monotonic()
        budget = [max_jobs]
        await asyncio.gather(
            *(
                client(http, mix, tally, t0 + duration, budget, i, job_timeout)
                for i in range(concurrency)
            )
        )
        elapsed = time.monotonic() - t0
        await drain(http, tally, drain_s)
    everything = [x for xs in tally.latency.values() for x in xs]
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 1),
        "requests": tally.requests,
        "jobs": tally.submitted,
        "jobs_per_s": round(tally.submitted / elapsed, 2),
        "finished": tally.finished,
        "failed": tally.failed,
        "lost": tally.submitted - tally.finished - tally.failed,
        "errors": len(tally.http_errors) + tally.failed,
        "throttled": tally.throttled,
        "latency_s": {"p50": pct(everything, 50), "p99": pct(everything, 99)},
        "latency_by_kind_s": {
            k: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
            for k, v in sorted(tally.latency.items())
        },
        "error_samples": tally.http_errors[:5],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running API (loopback)")
    p.add_argument("--concurrency", type=int, default=16, help="clients, each one job at a time")
    p.add_argument("--duration", type=float, default=120, help="seconds of submitting")
    p.add_argument("--max-jobs", type=int, default=20000, help="stop submitting after this many")
    p.add_argument("--job-timeout", type=float, default=300, help="a client gives up after")
    p.add_argument("--drain", type=float, default=60, help="seconds to wait for stragglers")
    a = p.parse_args(argv)
    report = asyncio.run(
        run(loopback_only(a.url), a.concurrency, a.duration, a.max_jobs, a.job_timeout, a.drain)
    )
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["errors"] or report["lost"] else 0)


if __name__ == "__main__":
    main()
