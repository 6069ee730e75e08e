"""A small Python client: submit, wait (poll), stream (SSE with Last-Event-ID resume)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx


class JobFailed(RuntimeError):
    pass


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
    ):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /run_task; raises httpx.HTTPStatusError on 4xx/5xx (the body says why)."""
        resp = self.http.post("/run_task", json=body)
        if resp.status_code >= 400:
            raise httpx.HTTPStatusError(
                f"{resp.status_code}: {resp.text}", request=resp.request, response=resp
            )
        return resp.json()

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/jobs/{job_id}")
        resp.raise_for_status()
        return resp.json()

    def wait(self, job_id: str, timeout: float = 600, interval: float = 0.05) -> dict[str, Any]:
        """Poll until the job is finished, failed or canceled (backing off to 1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if view["status"] in ("finished", "failed", "canceled"):
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout}s")
            time.sleep(interval)
            interval = min(1.0, interval * 1.5)

    def run(self, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Submit and wait; the result, or JobFailed with the worker's message."""
        view = self.wait(self.submit(body)["job_id"], timeout)
        if view["status"] != "finished":
            raise JobFailed(f"{view['status']}: {(view.get('error') or {}).get('message')}")
        return view["result"]

    def stream(
        self, job_id: str, last_event_id: str | None = None, reconnect: bool = True
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs until a terminal event; reconnects with Last-Event-ID."""
        for event, data, _ in self.stream_with_ids(job_id, last_event_id, reconnect):
            yield event, data

    def stream_with_ids(
        self, job_id: str, last_event_id: str | None = None, reconnect: bool = True
    ) -> Iterator[tuple[str, dict[str, Any], str]]:
        """With ``reconnect``, a dropped stream and a 503 (Redis restarting, or the API) are
        retried after a pause, resuming after the last event seen."""
        last = last_event_id
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream(
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30, read=None),
                ) as resp:
                    if resp.status_code == 503 and reconnect:
                        time.sleep(min(5.0, float(resp.headers.get("retry-after", 1))))
                        continue
                    resp.raise_for_status()
                    for event, data, eid in parse_sse(resp.iter_lines()):
                        last = eid or last
                        yield event, data, eid
                        if event in ("done", "error", "canceled"):
                            return
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                if not reconnect:
                    raise
                time.sleep(0.5)

    def heatmap(self, job_id: str) -> bytes:
        resp = self.http.get(f"/jobs/{job_id}/heatmap.png")
        resp.raise_for_status()
        return resp.content

    def cancel(self, job_id: str) -> dict[str, Any]:
        resp = self.http.delete(f"/jobs/{job_id}")
        resp.raise_for_status()
        return resp.json()

    def wait_ready(self, timeout: float = 600, processes: Sequence[subprocess.Popen] = ()) -> None:
        """Poll /readyz until it answers 200. ``processes`` are the service's own (API,
        workers): if one exits first, waiting longer is pointless."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a service process exited before the service was ready")
            if time.monotonic() > deadline:
                raise TimeoutError("service not ready")
            time.sleep(0.2)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """Minimal SSE parser: (event, json data, id) per dispatched event; comments skipped."""
    event, data, eid = "message", [], ""
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data)), eid
            event, data, eid = "message", [], ""
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                eid = value
