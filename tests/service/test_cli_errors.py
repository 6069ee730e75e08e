"""The CLI and the Python client show the server's message, never a traceback (issue 17).

The client's errors are checked against canned replies; the CLI against a real API process
(a private redis-server, no worker: every request here is refused at the door)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import Client, ServiceError, readable
from service.redis_server import PrivateRedis, free_port
from tests.helpers.stack import ROOT, start_api

PYDANTIC_422 = {
    "detail": [
        {"loc": ["body", "inputs", "text"], "msg": "String should have at least 1 character"},
        {"loc": ["query", "limit"], "msg": "Input should be a valid integer"},
    ]
}


def canned(status: int, **reply: object) -> Client:
    """A client whose every request gets this reply."""
    client = Client("http://service.test")
    transport = httpx.MockTransport(lambda _: httpx.Response(status, **reply))
    client.http = httpx.Client(base_url="http://service.test", transport=transport)
    return client


def test_readable_detail() -> None:
    assert readable("no job 'x' (unknown or expired)") == "no job 'x' (unknown or expired)"
    assert readable(PYDANTIC_422["detail"]) == (
        "inputs.text: String should have at least 1 character; "
        "limit: Input should be a valid integer"
    )
    assert readable([{"loc": ["body", "x"], "msg": "m", "message": "x: said by us"}]) == (
        "x: said by us"
    )


@pytest.mark.parametrize(
    ("call", "status", "reply", "message"),
    [
        ("cancel", 404, {"json": {"detail": "no job 'j1' (unknown or expired)"}}, "no job 'j1'"),
        ("heatmap", 409, {"json": {"detail": "the job has not finished"}}, "not finished"),
        ("submit", 422, {"json": PYDANTIC_422}, "inputs.text: String should have at least 1"),
        ("job", 503, {"json": {"detail": "queue unavailable, retry later"}}, "queue unavailable"),
        ("job", 502, {"text": "Bad gateway from the proxy"}, "502 Bad Gateway: Bad gateway from"),
    ],
)
def test_client_errors_carry_the_server_message(
    call: str, status: int, reply: dict, message: str
) -> None:
    client = canned(status, **reply)
    arg = {"model": "m", "inputs": {"text": ""}} if call == "submit" else "j1"
    with pytest.raises(ServiceError) as caught:
        getattr(client, call)(arg)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(status))
    assert caught.value.status_code == status
    assert isinstance(caught.value, httpx.HTTPStatusError)  # what callers caught before


def test_stream_error_carries_the_server_message() -> None:
    client = canned(404, json={"detail": "no job 'j1' (unknown or expired)"})
    with pytest.raises(ServiceError, match="404 Not Found: no job 'j1'"):
        list(client.stream("j1", reconnect=False))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cli")
    with PrivateRedis() as server:
        env = {**os.environ, "REDIS_URL": server.url, "PYTHONPATH": str(ROOT)}
        env.pop("BACKTRACE_REGISTRY", None)  # the demo registry
        proc, url = start_api(env, tmp / "api.log")
        try:
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model", "--text", "hi"], "'no-such-model' is not in the registry"),
        (["--model", "minilm-sentiment", "--text", ""], "422 Unprocessable Entity: inputs.text"),
    ],
    ids=["unknown-model", "empty-text"],
)
def test_cli_run_prints_the_server_message(
    api: str, args: list[str], message: str, tmp_path: Path
) -> None:
    done = cli("run", "--url", api, *args, tmp=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cli_run_unreachable_server_and_bad_arguments(tmp_path: Path) -> None:
    down = cli("run", "--url", f"http://127.0.0.1:{free_port()}", "--model", "m", tmp=tmp_path)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "python -m service run: cannot reach http://127.0.0.1:" in down.stderr
    bad = cli("run", "--model", "m", "--features", "1,x", tmp=tmp_path)
    assert bad.returncode == 2 and "not comma-separated numbers: '1,x'" in bad.stderr
    missing = cli("run", "--model", "m", "--image", "nowhere.png", tmp=tmp_path)
    assert missing.returncode == 2 and "cannot read nowhere.png" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr
