"""API settings other than the shared stack's, each on an extra API process: API keys, the
queue limit (back-pressure) and the job timeout."""

from __future__ import annotations

import uuid

import httpx

from tests.helpers.jobs import events, submit, wait
from tests.helpers.stack import start_api


def test_api_keys_and_back_pressure(stack) -> None:
    # A queue no worker reads: an idle worker takes a job off its queue as it is pushed, and
    # a job that never waited is accepted even past the limit.
    queue = f"keys-{uuid.uuid4().hex[:8]}"
    env = {
        **stack.env,
        "BACKTRACE_API_KEYS": "k1,k2",
        "BACKTRACE_MAX_QUEUE": "0",
        "BACKTRACE_QUEUE": queue,
    }
    proc, url = start_api(env, stack.tmp / "api-keys.log")
    try:
        body = {"model": "minilm-sentiment", "inputs": {"text": "fine"}}
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.post(f"{url}/run_task", json=body).status_code == 401
        # every route of a job, whether the job exists or not: the key comes first
        for method, path in [
            ("GET", "/jobs/x"),
            ("GET", "/jobs/x/events"),
            ("DELETE", "/jobs/x"),
            ("GET", "/jobs/x/heatmap.png"),
        ]:
            assert httpx.request(method, f"{url}{path}").status_code == 401, path
        wrong = httpx.post(f"{url}/run_task", json=body, headers={"X-API-Key": "k3"})
        assert wrong.status_code == 401
        assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        full = httpx.post(f"{url}/run_task", json=body, headers={"X-API-Key": "k1"})
        assert full.status_code == 429 and full.headers["retry-after"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_job_timeout_ends_failed_with_the_reason(stack) -> None:
    """The API sets RQ's job timeout (BACKTRACE_JOB_TIMEOUT); a job past it ends failed,
    with RQ's timeout message, and its stream ends with an error event."""
    proc, url = start_api({**stack.env, "BACKTRACE_JOB_TIMEOUT": "1"}, stack.tmp / "timeout.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            long = {
                "model": "gpt2-small-config",
                # a long prompt: 64 explained steps over it take well past the 1 s timeout
                # on an idle machine too (over the 1-word prompt they once ended in time)
                "inputs": {"text": "the " * 15},
                "generation": {"max_new_tokens": 64, "path": "stepwise"},
            }
            job = submit(c, long)["job_id"]
            evs = events(c, job)
            assert evs[-1][1] == "error" and "timeout" in evs[-1][2]["message"].lower()
            view = wait(c, job)
            assert view["status"] == "failed" and view["error"]["type"] == "JobTimeoutException"
    finally:
        proc.terminate()
        proc.wait(10)
