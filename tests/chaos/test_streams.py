"""Redis restarted under a running service, and SSE clients that read slowly or go away."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import httpx
from rq.suspension import resume, suspend

from tests.helpers.cluster import LONG_JOB, QUICK_JOB, Cluster, Listener, submit
from tests.helpers.jobs import wait


def test_redis_restart(cluster: Cluster) -> None:
    """While Redis is down the API answers 503 with Retry-After; afterwards the worker has
    reconnected, jobs queued before the restart run, and an SSE client of a job that was
    running gets every event once, in order."""
    (worker,) = cluster.workers(1)
    url, r = cluster.url, cluster.r()
    running = submit(url, LONG_JOB)
    sse = Listener(url, running)
    sse.wait_for("token", count=2)
    suspend(r)  # the worker takes no new job, so these stay queued across the restart
    queued = [submit(url, QUICK_JOB) for _ in range(3)]
    cluster.redis.stop()
    try:
        down = [
            httpx.post(f"{url}/run_task", json=QUICK_JOB),
            httpx.get(f"{url}/jobs/{running}"),
            httpx.get(f"{url}/jobs/{running}/events"),
            httpx.delete(f"{url}/jobs/{queued[0]}"),
            httpx.get(f"{url}/models"),
            httpx.get(f"{url}/readyz"),
        ]
        assert [x.status_code for x in down] == [503] * len(down), [x.text for x in down]
        assert all(x.headers.get("retry-after") for x in down[:-1])
        assert httpx.get(f"{url}/healthz").status_code == 200
        late = Listener(url, running)  # connects during the outage: 503, retried
        time.sleep(1)
    finally:
        cluster.redis.start()
    resume(r)
    names = sse.join(timeout=120)
    assert names[-1] == "done" and names.count("token") == 64, names
    ids = [tuple(map(int, i.split("-"))) for _, _, i in sse.events]
    assert ids == sorted(set(ids)), "events repeated or out of order after the restart"
    late.join(timeout=30)
    assert late.events == sse.events
    with httpx.Client(base_url=url, timeout=30) as c:
        for job in queued:
            assert wait(c, job, timeout=60)["status"] == "finished"
        after = wait(c, submit(url, QUICK_JOB), timeout=60)
        assert after["status"] == "finished" and worker.proc.poll() is None
        assert after["result"]["receipt"]["worker"] == worker.name


def plant_stream(cluster: Cluster, events: int, size: int, terminal: bool) -> str:
    """A job's event stream written straight into Redis: ``events`` entries of ``size``
    bytes, ending with ``done`` or (a job still queued) not ending."""
    r, job_id = cluster.r(), uuid.uuid4().hex
    key = f"bt:events:{job_id}"
    blob = json.dumps({"pad": "x" * size})
    pipe = r.pipeline(transaction=False)
    for _ in range(events):
        pipe.xadd(key, {"event": "token", "data": blob})
    if terminal:
        pipe.xadd(key, {"event": "done", "data": "{}"})
    pipe.hset(f"rq:job:{job_id}", "status", "queued")
    pipe.expire(key, 300)
    pipe.expire(f"rq:job:{job_id}", 300)
    pipe.execute()
    return job_id


def open_stream(url: str, job_id: str, rcvbuf: int = 4096) -> socket.socket:
    """A raw HTTP/1.1 SSE request on a socket with a small receive buffer, so that a client
    that stops reading stops the server's writes quickly."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert b"200 OK" in sock.recv(1024)
    return sock


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def sse_clients(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("backtrace_sse_clients "))
    return float(line.split()[1])


def xread_calls(cluster: Cluster) -> int:
    return int(cluster.r().info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def test_slow_reader_does_not_grow_server_memory(cluster: Cluster) -> None:
    """64 MB of events behind a client that stops reading: the API holds at most a batch of
    them (the server's send waits on the full socket), then serves the rest when it reads."""
    events, size = 2000, 32 << 10
    job_id = plant_stream(cluster, events, size, terminal=True)
    api_pid = cluster.apis[0].pid
    warm = open_stream(cluster.url, job_id)  # one full read first: buffers and caches warm
    read_to_done(warm)
    warm.close()
    before = rss_bytes(api_pid)
    stalled = [open_stream(cluster.url, job_id) for _ in range(4)]
    time.sleep(3)
    grown = rss_bytes(api_pid) - before
    assert grown < events * size // 4, f"API grew {grown >> 20} MB behind stalled readers"
    assert read_to_done(stalled[0]) > events * size
    for s in stalled:
        s.close()


def read_to_done(sock: socket.socket) -> int:
    """Read an SSE response until its ``done`` event; returns the bytes read."""
    received, tail = 0, b""
    while b"event: done" not in tail:
        chunk = sock.recv(1 << 20)
        assert chunk, "stream closed before done"
        received += len(chunk)
        tail = tail[-16:] + chunk
    return received


def test_events_of_one_read_go_out_as_one_chunk(cluster: Cluster) -> None:
    """A stream whose events are all in Redis: the retry hint, every event and the end of the
    response come as one HTTP chunk, and the client counts as gone once it is sent."""
    job_id = plant_stream(cluster, 3, 100, terminal=True)
    host, port = cluster.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    raw = b""
    while not raw.endswith(b"\r\n0\r\n\r\n"):
        more = sock.recv(1 << 16)
        assert more, raw
        raw += more
    sock.close()
    body = raw.split(b"\r\n\r\n", 1)[1]
    size, rest = body.split(b"\r\n", 1)
    chunk = rest[: int(size, 16)]
    assert rest[int(size, 16) :] == b"\r\n0\r\n\r\n", "more than one chunk"
    assert chunk.startswith(b"retry: 2000\n\n") and chunk.count(b"event: token") == 3
    assert chunk.endswith(b"event: done\ndata: {}\n\n")
    assert sse_clients(cluster.url) == 0


def test_disconnected_client_is_noticed_and_its_reader_stops(cluster: Cluster) -> None:
    """A stream of a job that never ends: once the client goes (also while the server is
    blocked writing to it), the API stops counting it and stops reading Redis for it."""
    idle = plant_stream(cluster, 0, 0, terminal=False)
    busy = plant_stream(cluster, 200, 32 << 10, terminal=False)
    base = sse_clients(cluster.url)
    socks = [open_stream(cluster.url, idle), open_stream(cluster.url, busy)]
    deadline = time.monotonic() + 10
    while sse_clients(cluster.url) < base + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sse_clients(cluster.url) == base + 2
    time.sleep(1.5)  # the busy one is now stalled on its full socket
    for s in socks:
        s.close()
    deadline = time.monotonic() + 5
    while sse_clients(cluster.url) > base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sse_clients(cluster.url) == base
    calls = xread_calls(cluster)
    time.sleep(2.5)  # the keep-alive is 1 s: a reader still running would XREAD again
    assert xread_calls(cluster) - calls <= 1
