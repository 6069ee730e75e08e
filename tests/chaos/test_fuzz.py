"""Schema-driven fuzzing (schemathesis) of a running API: requests generated from its own
OpenAPI spec, valid and invalid, and not one 5xx answer.

The API under fuzz shares the session's Redis but enqueues to a queue of its own that no
worker reads (generated jobs are valid but may be minutes of work each), with a small queue
limit so that back-pressure (429) is fuzzed too."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.helpers.stack import Stack, start_api

QUEUE = "fuzz"
EXAMPLES = 300  # per test; Hypothesis may stop a few short when it has seen every case


@pytest.fixture(scope="module")
def fuzz_url(stack: Stack) -> Iterator[str]:
    env = {**stack.env, "BACKTRACE_QUEUE": QUEUE, "BACKTRACE_MAX_QUEUE": "20"}
    proc, url = start_api(env, stack.tmp / "fuzz-api.log")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        r = redis.Redis.from_url(stack.redis_url)
        for key in r.scan_iter(f"rq:queue:{QUEUE}"):
            for job_id in r.lrange(key, 0, -1):
                r.delete(f"rq:job:{job_id.decode()}", f"bt:events:{job_id.decode()}")
            r.delete(key)


@pytest.mark.parametrize(
    ("mode", "only"),
    [
        (GenerationMode.POSITIVE, None),
        (GenerationMode.NEGATIVE, None),
        (GenerationMode.POSITIVE, ("/run_task", "POST")),
    ],
    ids=["valid", "invalid", "valid-run_task"],
)
def test_no_server_errors(fuzz_url: str, mode: GenerationMode, only: tuple | None) -> None:
    """Every operation of the spec with valid data and with data that breaks it, and POST
    /run_task alone with valid data (where most of the checking is); the API's own request
    counter confirms the number sent."""
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    target = schema[only[0]][only[1]] if only else schema
    before = requests_served(fuzz_url)
    failures: list[str] = []
    sent: list[int] = []

    models = [m["id"] for m in httpx.get(f"{fuzz_url}/models").json()["models"]]
    cases = st.tuples(target.as_strategy(mode), st.sampled_from(models)).map(_registry_model)

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        resp = case.call(timeout=30)
        sent.append(resp.status_code)
        if resp.status_code >= 500:
            failures.append(f"{resp.status_code} {resp.text[:200]}\n{case.as_curl_command()}")

    fuzz()
    assert not failures, "\n".join(failures[:5])
    # Counted by the API too (less the odd request that the HTTP server itself rejects).
    assert len(sent) >= 0.9 * EXAMPLES and requests_served(fuzz_url) - before >= 0.9 * len(sent)
    print(mode.value, only, sorted(Counter(sent).items()))


def _registry_model(pair: tuple[schemathesis.Case, str]) -> schemathesis.Case:
    """Bodies name a registry model, so that fuzzing gets past the 404 for unknown models
    to the checks of inputs against each model's limits."""
    case, model = pair
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = model
    return case


def requests_served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("backtrace_http_requests_total{") and "/metrics" not in line
    )
