"""A job's event stream at its edges, against the session's real stack: a job whose worker
died, a client that goes away, a POST that streams its job's events at once."""

from __future__ import annotations

import time

import httpx
import redis

from service.client import parse_sse
from tests.helpers.jobs import events, submit, wait


def test_stream_of_a_job_whose_worker_died_ends_with_error(client: httpx.Client, stack) -> None:
    """What a killed worker leaves behind: events up to 'started', RQ status failed (after
    RQ's abandoned-job cleanup), no terminal event. The stream must still end."""
    r = redis.Redis.from_url(stack.redis_url)
    job_id = "deadbeef" * 4
    r.xadd(f"bt:events:{job_id}", {"event": "queued", "data": "{}"})
    r.xadd(f"bt:events:{job_id}", {"event": "started", "data": "{}"})
    r.hset(f"rq:job:{job_id}", mapping={"status": "failed"})
    r.expire(f"bt:events:{job_id}", 60)
    r.expire(f"rq:job:{job_id}", 60)
    t0 = time.time()
    evs = events(client, job_id)
    assert [e for _, e, _ in evs] == ["queued", "started", "error"]
    assert "without a result" in evs[-1][2]["message"] and time.time() - t0 < 10


def test_sse_client_disconnect_is_noticed(client: httpx.Client, stack) -> None:
    """A client that goes away stops being counted (and read for) within a keep-alive."""
    long = {
        "model": "gpt2-small-config",
        "inputs": {"text": "xyz"},
        "generation": {"max_new_tokens": 64, "path": "stepwise"},
    }
    job = submit(client, long)["job_id"]
    with (
        httpx.Client(base_url=stack.url) as other,
        other.stream("GET", f"/jobs/{job}/events") as resp,
    ):
        for event, _, _ in parse_sse(resp.iter_lines()):
            if event == "started":
                break
    client.delete(f"/jobs/{job}")
    deadline = time.time() + 10
    while time.time() < deadline:
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("backtrace_sse_clients "))
        if float(line.split()[1]) == 0:
            break
        time.sleep(0.2)
    assert float(line.split()[1]) == 0
    wait(client, job)


def test_post_that_streams(client: httpx.Client) -> None:
    """POST /run_task with Accept: text/event-stream answers with the job's events at once;
    the same events, with the same ids, are then on the events URL for resuming."""
    body = {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1 f9 h0 ? c"},
        "generation": {"max_new_tokens": 3},
    }
    accept = {"Accept": "text/event-stream", "Idempotency-Key": f"stream-{time.time()}"}
    with client.stream("POST", "/run_task", json=body, headers=accept) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        job = resp.headers["x-job-id"]
        assert resp.headers["location"] == f"/jobs/{job}"
        streamed = []
        for event, data, eid in parse_sse(resp.iter_lines()):
            streamed.append((eid, event, data))
            if event in ("done", "error", "canceled"):
                break
    names = [e for _, e, _ in streamed]
    assert names[0] == "queued" and names[-1] == "done" and "token" in names
    assert events(client, job) == streamed
    assert wait(client, job)["status"] == "finished"
    # a repeat with the same Idempotency-Key streams the same job again
    with client.stream("POST", "/run_task", json=body, headers=accept) as resp:
        assert resp.headers["x-job-id"] == job and resp.headers["idempotent-replayed"] == "true"
        again = [e for e, _, _ in parse_sse(resp.iter_lines())]
    assert again == names
