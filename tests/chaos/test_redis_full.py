"""Redis out of memory (maxmemory reached, noeviction: writes refused) under a running API:
a POST is a 503 with Retry-After that says so, not a 500; reads still answer; once memory
is back the API takes jobs again."""

from __future__ import annotations

import httpx
import redis

from service.redis_server import PrivateRedis
from tests.helpers.stack import Stack, start_api

JOB = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}


def test_a_full_redis_is_a_503_that_says_so(stack: Stack) -> None:
    with PrivateRedis() as server:
        proc, url = start_api({**stack.env, "REDIS_URL": server.url}, stack.tmp / "full.log")
        r = redis.Redis.from_url(server.url)
        try:
            job_id = httpx.post(f"{url}/run_task", json=JOB).json()["job_id"]
            r.config_set("maxmemory", 1)
            resp = httpx.post(f"{url}/run_task", json=JOB)
            assert resp.status_code == 503, resp.text
            assert resp.json()["detail"] == (
                "queue full: Redis is out of memory (its maxmemory), retry later"
            )
            assert int(resp.headers["retry-after"]) > 0
            assert httpx.get(f"{url}/jobs/{job_id}").json()["status"] == "queued"
            r.config_set("maxmemory", 0)
            assert httpx.post(f"{url}/run_task", json=JOB).status_code == 202
        finally:
            proc.terminate()
            proc.wait(10)
