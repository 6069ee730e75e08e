"""Abuse of the API, against the session's shared stack: repeated POSTs with an
Idempotency-Key, API keys, models and payloads from outside the registry, pickles planted in
Redis, bodies over the limit sent chunked, text that only the worker can count."""

from __future__ import annotations

import base64
import pickle
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from tests.helpers.jobs import wait
from tests.helpers.stack import Stack, start_api

TEXT = {"model": "minilm-sentiment", "inputs": {"text": "the same request, sent again"}}


def job_keys(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter("rq:job:*", count=1000))


def test_idempotency_key_makes_one_job(client: httpx.Client, stack: Stack) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    before = job_keys(r)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: client.post("/run_task", json=TEXT, headers=key), range(8))
        )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7
    job_id = answers[0].json()["job_id"]
    assert wait(client, job_id)["status"] == "finished"
    again = client.post("/run_task", json=TEXT, headers=key)
    assert again.status_code == 202 and again.json()["job_id"] == job_id
    assert job_keys(r) - before == {f"rq:job:{job_id}".encode()}
    other = {**TEXT, "inputs": {"text": "another request"}}
    assert client.post("/run_task", json=other, headers=key).status_code == 422
    assert client.post("/run_task", json=TEXT, headers={"Idempotency-Key": ""}).status_code == 422
    assert (
        client.post("/run_task", json=TEXT, headers={"Idempotency-Key": "k" * 256}).status_code
        == 422
    )


def test_api_keys_scope_idempotency_and_never_leak(stack: Stack) -> None:
    """Two callers using the same Idempotency-Key get their own jobs; a near-miss key (same
    length, one character off), a key in the query string or in the wrong scheme are
    refused; nothing echoes a key."""
    proc, url = start_api(
        {**stack.env, "BACKTRACE_API_KEYS": "alpha-key-1,bravo-key-2"}, stack.tmp / "keys.log"
    )
    try:
        same = {"Idempotency-Key": "order-42"}
        a = httpx.post(f"{url}/run_task", json=TEXT, headers={**same, "X-API-Key": "alpha-key-1"})
        b = httpx.post(
            f"{url}/run_task", json=TEXT, headers={**same, "Authorization": "bearer bravo-key-2"}
        )
        assert a.status_code == b.status_code == 202
        assert a.json()["job_id"] != b.json()["job_id"]
        refused = [
            httpx.get(f"{url}/models", headers={"X-API-Key": "alpha-key-2"}),
            httpx.get(f"{url}/models?api_key=alpha-key-1"),
            httpx.get(f"{url}/models", headers={"Authorization": "Basic alpha-key-1"}),
            httpx.get(f"{url}/jobs/{a.json()['job_id']}"),
            httpx.get(f"{url}/jobs/{a.json()['job_id']}/events"),
        ]
        assert [x.status_code for x in refused] == [401] * len(refused)
        assert not any("key-" in x.text for x in refused)
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_queue_deeper_than_its_limit_is_429(stack: Stack) -> None:
    """Back-pressure: past BACKTRACE_MAX_QUEUE waiting jobs, 429 with Retry-After, and the
    queue does not grow (an API on a queue of its own that no worker reads)."""
    queue = f"full-{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "BACKTRACE_QUEUE": queue, "BACKTRACE_MAX_QUEUE": "3"}
    proc, url = start_api(env, stack.tmp / "full.log")
    r = redis.Redis.from_url(stack.redis_url)
    try:
        answers = [httpx.post(f"{url}/run_task", json=TEXT) for _ in range(6)]
        assert [a.status_code for a in answers] == [202] * 3 + [429] * 3
        assert all(int(a.headers["retry-after"]) > 0 for a in answers[3:])
        assert r.llen(f"rq:queue:{queue}") == 3
    finally:
        proc.terminate()
        proc.wait(10)
        for job_id in r.lrange(f"rq:queue:{queue}", 0, -1):
            r.delete(f"rq:job:{job_id.decode()}", f"bt:events:{job_id.decode()}")
        r.delete(f"rq:queue:{queue}")


@pytest.mark.parametrize(
    "model",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "https://example.com/model.pt",
        "gpt2",
        "openai-community/gpt2",
        "tests.service.faulty:build",
        "minilm-sentiment/../digits-cnn",
        "MINILM-SENTIMENT",
    ],
)
def test_models_outside_the_registry_are_refused(client: httpx.Client, model: str) -> None:
    resp = client.post("/run_task", json={"model": model, "inputs": {"text": "x"}})
    assert resp.status_code in (404, 422), resp.text


def test_a_request_cannot_carry_a_model_source(client: httpx.Client) -> None:
    for extra in (
        {"source": {"kind": "python", "factory": "os:system"}},
        {"inputs": {"text": "x", "path": "/etc/passwd"}},
        {"output": {"relevance": "inputs", "module": "os"}},
    ):
        assert client.post("/run_task", json={**TEXT, **extra}).status_code == 422


def test_worker_refuses_a_queued_job_for_a_model_outside_its_registry(
    client: httpx.Client, stack: Stack
) -> None:
    """A job that did not come through the API (written to the queue directly): the worker
    looks the id up in its own registry, loads nothing, and ends the job failed."""
    r = redis.Redis.from_url(stack.redis_url)
    job_id = uuid.uuid4().hex
    request = {"model": "../../../tmp/evil", "task": "text-classification", "inputs": {"text": "x"}}
    Queue(connection=r, serializer=JSONSerializer).enqueue_call(
        "service.jobs.run_job", kwargs={"request": request}, job_id=job_id
    )
    view = wait(client, job_id, timeout=60)
    assert (
        view["status"] == "failed" and "not in this worker's registry" in view["error"]["message"]
    )


class _Tripwire:
    """Unpickling this creates the marker file: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_api_never_unpickles_what_is_in_redis(client: httpx.Client, stack: Stack, tmp_path) -> None:
    """Pickles planted wherever the API reads: RQ's job hash and result stream, our result
    document and event stream. Nothing is unpickled, and nothing answers 5xx."""
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Tripwire(marker))
    r = redis.Redis.from_url(stack.redis_url)
    ids = [uuid.uuid4().hex for _ in range(2)]
    for job_id, status in zip(ids, ("finished", "failed"), strict=True):
        r.hset(
            f"rq:job:{job_id}",
            mapping={"data": bomb, "meta": bomb, "status": status, "exc_info": bomb},
        )
        r.xadd(f"rq:results:{job_id}", {"type": 2, "return_value": base64.b64encode(bomb)})
        r.xadd(f"bt:events:{job_id}", {"event": "done", "data": bomb})
    r.set(f"bt:result:{ids[0]}", bomb)
    for job_id in ids:
        answers = [
            client.get(f"/jobs/{job_id}"),
            client.get(f"/jobs/{job_id}/heatmap.png"),
            client.delete(f"/jobs/{job_id}"),
            client.get(f"/jobs/{job_id}/events"),
        ]
        assert all(a.status_code < 500 for a in answers), [(a.status_code, a.text) for a in answers]
        # the planted ending is not text: the stream still ends, with an error saying so
        assert (
            answers[3].text.rstrip().endswith("\"the job's ending in Redis is not the service's\"}")
        )
    assert not marker.exists(), "the API unpickled a value from Redis"


def test_chunked_body_is_cut_off_at_the_limit(stack: Stack) -> None:
    """No Content-Length, chunks that keep coming: the API answers 413 once the limit is
    passed, without waiting for the end of the body."""
    host, port = stack.url.removeprefix("http://").split(":")
    limit = 1 << 20  # BACKTRACE_MAX_BODY_BYTES of the shared stack
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /run_task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"A" * 65536
        for _ in range(limit // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = sock.recv(4096)  # the last chunk was never sent
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_text_over_max_tokens_is_counted_at_the_door(client: httpx.Client) -> None:
    """The API counts real tokens where it knows the model's tokenizer (ee5c305): a text over
    the model's limit is a 422 naming the count and the limit, never a queued job."""
    body = {"model": "minilm-sentiment", "inputs": {"text": "good " * 300}}
    r = client.post("/run_task", json=body)
    assert r.status_code == 422, r.text
    assert "inputs.text: 302 tokens, more than max_tokens=128" in r.text
