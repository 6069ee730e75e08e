"""Jobs over HTTP, the way a client of the API runs them: submit, poll until a terminal
status, read the event stream until a terminal event."""

from __future__ import annotations

import time
from typing import Any

import httpx

from service.client import parse_sse
from service.vocabulary import TERMINAL_EVENTS, JobStatus

FINAL_STATUSES = frozenset(s for s in JobStatus if s.terminal)


def wait(client: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    """The job's view once its status is final, polled the way a client without SSE does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] in FINAL_STATUSES:
            return view
        time.sleep(0.05)
    raise TimeoutError(job_id)


def events(
    client: httpx.Client, job_id: str, last_id: str | None = None, comments: list[str] | None = None
) -> list[tuple[str, str, dict]]:
    """(id, event, data) until a terminal event; comment lines go to ``comments``."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    out = []
    with client.stream(
        "GET", f"/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60)
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["x-accel-buffering"] == "no"

        def lines():
            for line in resp.iter_lines():
                if line.startswith(":") and comments is not None:
                    comments.append(line)
                yield line

        for event, data, eid in parse_sse(lines()):
            out.append((eid, event, data))
            if event in TERMINAL_EVENTS:
                break
    return out


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The accepted job (202: its id, status and URLs); any other answer fails the test."""
    resp = client.post("/run_task", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def refused_layers(client: httpx.Client, body: dict[str, Any]) -> str:
    """The reason a job naming unknown layers fails with, on a model whose graph the door does
    not know yet: the worker fails the job (status and final ``error`` event say why), and the
    same body is then refused at the door with the same message on ``output.relevance``."""
    job = submit(client, body)["job_id"]
    *_, (_, last, data) = events(client, job)
    view = wait(client, job)
    assert view["status"] == JobStatus.FAILED, view
    reason = view["error"]["message"]
    assert (last, data["message"]) == ("error", reason)
    resp = client.post("/run_task", json=body)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert (error["loc"], error["message"]) == (["body", "output", "relevance"], reason)
    return reason
