"""The door over real HTTP, on an API alone (the demo registry, a private Redis, no worker):
bodies that JSON parses but the service must not take as they came, and the probes that
Kubernetes and load balancers send with HEAD."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.stack import ROOT, start_api

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("door-http")
    drop = ("BACKTRACE_REGISTRY", "BACKTRACE_API_KEYS", "BACKTRACE_QUEUE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "BACKTRACE_DATA_DIR": str(tmp)}
    proc, api = start_api(env, tmp / "api.log")
    try:
        yield api
    finally:
        proc.terminate()
        proc.wait(10)


def _error(resp: httpx.Response) -> dict:
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    return error


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model": "digits-cnn", "model": "minilm-sentiment", "inputs": {"text": "x"}}', "model"),
        (b'{"model": "minilm-sentiment", "inputs": {"text": "a", "text": "b"}}', "text"),
        (
            b'{"model": "digits-cnn", "inputs": {"features": [[1]]}, "relevance": '
            b'{"mode": "default", "target": 0, "target": 1}}',
            "target",
        ),
    ],
    ids=["top", "inputs", "relevance"],
)
def test_a_key_twice_in_one_object_is_422_naming_it(url: str, body: bytes, key: str) -> None:
    error = _error(httpx.post(f"{url}/run_task", content=body, headers=JSON))
    assert error["message"] == (f"request body names key {key!r} twice in one object: send it once")
    assert error["loc"] == ["body"] and error["type"] == "json_duplicate_key"


def test_the_same_key_in_two_objects_is_taken_apart(url: str) -> None:
    """Keys are unique per object: ``text`` in inputs and in no other object is fine, and a
    body that fails for another reason still says that reason."""
    body = b'{"model": "nope", "inputs": {"text": "x"}, "output": {"text": 1}}'
    resp = httpx.post(f"{url}/run_task", content=body, headers=JSON)
    assert resp.status_code == 422 and "json_duplicate_key" not in resp.text, resp.text


@pytest.mark.parametrize(
    ("body", "field", "where"),
    [
        (b'{"model": "minilm-sentiment", "inputs": {"text": "a\\ud800b"}}', "inputs.text", 2),
        (
            b'{"model": "minilm-sentiment", "inputs": {"text": ["ok", "\\udfff"]}}',
            "inputs.text.1",
            1,
        ),
        (b'{"model": "x\\ud800", "inputs": {"text": "fine"}}', "model", 2),
    ],
    ids=["text", "text-list", "model"],
)
def test_an_unpaired_surrogate_is_422_naming_the_field(
    url: str, body: bytes, field: str, where: int
) -> None:
    error = _error(httpx.post(f"{url}/run_task", content=body, headers=JSON))
    char = "\\udfff" if b"udfff" in body else "\\ud800"
    assert error["message"] == (
        f"{field}: the text holds an unpaired surrogate ({char} at character {where}), "
        "not valid Unicode"
    )
    assert error["type"] == "string_unicode"


def test_a_surrogate_pair_is_text(url: str) -> None:
    """A pair of escapes is one character (an emoji): nothing to refuse there."""
    body = b'{"model": "nope", "inputs": {"text": "\\ud83d\\ude00"}}'
    assert httpx.post(f"{url}/run_task", content=body, headers=JSON).status_code == 404


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_head_as_get_without_a_body(url: str, path: str) -> None:
    get, head = httpx.get(f"{url}{path}"), httpx.head(f"{url}{path}")
    assert head.status_code == get.status_code, head.text  # /readyz: 503, no worker here
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.content == b""
    assert "head" not in httpx.get(f"{url}/openapi.json").json()["paths"][path]
