"""A small Python client: submit, wait (poll), stream (SSE with Last-Event-ID resume).

Every call that gets a 4xx or 5xx reply raises ``ServiceError`` carrying the server's own
message (its JSON ``detail``, made readable), so that a script or the CLI can show why."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from .vocabulary import TERMINAL_EVENTS, JobStatus

FINAL_STATUSES = frozenset(s for s in JobStatus if s.terminal)


class JobFailed(RuntimeError):
    pass


class NotTheService(RuntimeError):
    """A 2xx reply that is not the service's JSON (a proxy's or another server's page)."""


class ServiceExited(RuntimeError):
    """A process of a service being waited for (``Client.wait_ready``) exited first."""


class ServiceError(httpx.HTTPStatusError):
    """A 4xx/5xx reply. ``str()`` is one readable line, e.g. ``404 Not Found: model 'x' is
    not in the registry (GET /models)``; ``detail`` is the reply's JSON ``detail`` as sent.
    An ``httpx.HTTPStatusError``, so code that caught that before still does."""

    def __init__(self, response: httpx.Response):
        try:
            body = response.json()
        except ValueError:
            body = None
        self.detail = body.get("detail") if isinstance(body, dict) else None
        self.status_code = response.status_code
        text = response.text.strip()[:500] or None
        message = readable(self.detail) if self.detail is not None else text
        super().__init__(
            f"{response.status_code} {response.reason_phrase}: {message or 'no message'}",
            request=response.request,
            response=response,
        )


def readable(detail: Any) -> str:
    """A JSON ``detail`` as one line: a string as is; FastAPI's list of ``{loc, msg}`` as
    ``field.path: msg`` items (the server's own ``message`` when it sends one) joined by
    '; '."""
    if isinstance(detail, list):
        return "; ".join(readable(item) for item in detail)
    if not isinstance(detail, dict):
        return str(detail)
    if detail.get("message"):
        return str(detail["message"])
    loc = [str(p) for p in detail.get("loc", ())]
    if loc[:1] in (["body"], ["query"], ["path"], ["header"]) and len(loc) > 1:
        loc = loc[1:]
    msg = detail.get("msg", json.dumps(detail))
    return f"{'.'.join(loc)}: {msg}" if loc else str(msg)


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or ``ServiceError`` for a 4xx/5xx (a streamed body is read first)."""
    if response.status_code >= 400:
        response.read()
        raise ServiceError(response)
    return response


def reply(response: httpx.Response) -> dict[str, Any]:
    """A checked reply's JSON object; ``NotTheService`` for any other body (a URL that
    reaches a proxy's or another server's page was a JSONDecodeError traceback)."""
    try:
        body = checked(response).json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        what = response.headers.get("content-type") or "no content type"
        raise NotTheService(
            f"{response.request.method} {response.request.url} answered {response.status_code} "
            f"with {what}, not the service's JSON: is this the backtrace API?"
        )
    return body


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
        """POST /run_task; ``ServiceError`` with the server's reason on 4xx/5xx."""
        return reply(self.http.post("/run_task", json=body))

    def job(self, job_id: str) -> dict[str, Any]:
        return reply(self.http.get(f"/jobs/{job_id}"))

    def wait(self, job_id: str, timeout: float = 600, interval: float = 0.05) -> dict[str, Any]:
        """Poll until the job is finished, failed or canceled (backing off to 1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if view["status"] in FINAL_STATUSES:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout}s")
            time.sleep(interval)
            interval = min(1.0, interval * 1.5)

    def run(self, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Submit and wait; the result, or JobFailed with the worker's message."""
        view = self.wait(self.submit(body)["job_id"], timeout)
        if view["status"] != JobStatus.FINISHED:
            raise JobFailed(f"{view['status']}: {(view.get('error') or {}).get('message')}")
        return view["result"]

    def stream(
        self, job_id: str, last_event_id: str | None = None, reconnect: bool = True
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs until a terminal event; reconnects with Last-Event-ID."""
        for event, data, _ in self.stream_with_ids(job_id, last_event_id, reconnect):
            yield event, data

    def stream_with_ids(
        self,
        job_id: str,
        last_event_id: str | None = None,
        reconnect: bool = True,
        give_up_s: float = 120.0,
    ) -> Iterator[tuple[str, dict[str, Any], str]]:
        """With ``reconnect``, a dropped stream and a 503 (Redis restarting, or the API) are
        retried after a pause, resuming after the last event seen; a server that cannot be
        reached for ``give_up_s`` raises the last error (a server gone for good kept a
        reader retrying forever)."""
        last = last_event_id
        unreachable_since: float | None = None
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
                    unreachable_since = None
                    if resp.status_code == 204:  # resumed after the ending: nothing follows
                        return
                    checked(resp)
                    for event, data, eid in parse_sse(resp.iter_lines()):
                        last = eid or last
                        yield event, data, eid
                        if event in TERMINAL_EVENTS:
                            return
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if not reconnect or now - unreachable_since > give_up_s:
                    raise
                time.sleep(0.5)

    def heatmap(self, job_id: str) -> bytes:
        return checked(self.http.get(f"/jobs/{job_id}/heatmap.png")).content

    def cancel(self, job_id: str) -> dict[str, Any]:
        return reply(self.http.delete(f"/jobs/{job_id}"))

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
                raise ServiceExited("a service process exited before the service was ready")
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
