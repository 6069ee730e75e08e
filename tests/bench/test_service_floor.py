"""bench.floor answers bench.service's clients in both flows, and bench.service reports our
overhead as a multiple of the floor's p50."""

from __future__ import annotations

import argparse
import http.client
import io
import shutil
import time
from collections.abc import Iterator

import pytest

from bench import floor
from bench.service import LeanClient, Target, one, sse_lines, summary
from service.client import Client
from service.redis_server import PrivateRedis, free_port

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


@pytest.fixture(scope="module")
def floor_port() -> Iterator[int]:
    """The floor, idle for longer than redis-py's 5 s socket timeout before its first job, as
    it is while bench.service warms the service up (its blocking reads must outlive that)."""
    with PrivateRedis() as server:
        port = free_port()
        procs = floor.start(server.url, port)
        try:
            Client(f"http://127.0.0.1:{port}").wait_ready(timeout=60, processes=procs)
            time.sleep(6)
            yield port
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)


@pytest.mark.parametrize("stream_post", [False, True], ids=["post-then-get", "streaming-post"])
def test_floor_relays_done_to_the_bench_client(floor_port: int, stream_post: bool) -> None:
    client = LeanClient(floor_port, stream_post)
    for _ in range(3):  # one keep-alive connection, several jobs
        e2e, engine, queue_wait, batch, accepted = one(client, b'{"model": "x"}')
        assert 0 < accepted <= e2e and (engine, queue_wait, batch) == (0.0, 0.0, 1)


def test_overhead_vs_floor_is_the_ratio_of_p50s() -> None:
    # (end-to-end, engine, queue wait, batch jobs, POST answered) per request.
    service = Target(1, {"api": 0})
    service.results = [(0.030, 0.010, 0.0, 1, 0.001)] * 3 + [RuntimeError("lost")]
    service.wall = 1.0
    bare = Target(2, {"api": 0})
    bare.results = [(0.010, 0.0, 0.0, 1, 0.001)] * 4
    bare.wall = 1.0
    a = argparse.Namespace(
        requests=4, concurrency=1, workers=1, model="m", torch_threads=1, stream_post=False
    )
    out = summary(a, service, bare)
    assert out["errors"] == 1 and out["floor"]["errors"] == 0
    assert out["overhead_p50_ms"] == 20.0 and out["floor"]["p50_ms"] == 10.0
    assert out["overhead_vs_floor"] == 2.0


class _Canned:
    """A socket whose reads give ``data`` (an HTTP response) in pieces of ``size`` bytes."""

    def __init__(self, data: bytes, size: int):
        self.data, self.size = data, size

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data), buffer_size=self.size)


STREAM = (
    b"retry: 2000\n\nid: 1-0\nevent: queued\ndata: {}\n\n: keep-alive\n\n"
    b'id: 2-0\r\nevent: done\r\ndata: {"a": 1}\r\n\r\n'
)


@pytest.mark.parametrize("chunk", [1, 7, len(STREAM)])
@pytest.mark.parametrize("piece", [3, 4096])
def test_sse_lines_are_readlines_lines(chunk: int, piece: int) -> None:
    """The load generator's lines are those ``readline`` gives, however the stream's chunks
    and the socket's reads cut them."""
    chunks = [STREAM[i : i + chunk] for i in range(0, len(STREAM), chunk)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"

    def response() -> http.client.HTTPResponse:
        resp = http.client.HTTPResponse(_Canned(head + body, piece))  # type: ignore[arg-type]
        resp.begin()
        return resp

    by_line = [raw.decode().rstrip("\r\n") for raw in iter(response().readline, b"")]
    assert list(sse_lines(response())) == by_line
