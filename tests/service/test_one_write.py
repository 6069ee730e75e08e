"""The API's HTTP protocol (``service.api.one_write``) sends a response's headers and the
body written in the same step as one TCP segment, and still sends what comes later, in
order. Counted with a real uvicorn server on loopback and the client socket's
``tcpi_data_segs_in`` (Linux ``TCP_INFO``): uvicorn's own protocol sends two."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.one_write import OneWriteProtocol
from service.redis_server import free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO is Linux's")

DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in struct tcp_info (Linux 4.6 on)


def app() -> FastAPI:
    api = FastAPI()

    @api.post("/job")
    async def job() -> JSONResponse:
        return JSONResponse({"job_id": "x" * 32}, status_code=202)

    @api.get("/big")
    async def big() -> StreamingResponse:
        async def chunks():
            for i in range(64):  # 4 MiB in one step: written as they come, in order
                yield bytes([65 + i % 26]) * (64 << 10)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @api.get("/slow")
    async def slow() -> StreamingResponse:
        async def events():
            yield "event: a\n\n"
            await asyncio.sleep(0.05)  # a later step: its own write, after the first
            yield "event: b\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return api


@pytest.fixture(params=[OneWriteProtocol, HttpToolsProtocol], ids=["one_write", "uvicorn"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, type]]:
    port = free_port()
    config = uvicorn.Config(app(), port=port, http=request.param, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield port, request.param
    srv.should_exit = True
    thread.join(10)


def data_segments(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, DATA_SEGS_IN)[0]


def exchange(port: int, request: bytes, until: bytes) -> tuple[bytes, int]:
    """The response to ``request`` on a fresh connection, read until it ends with
    ``until``, and how many TCP segments with data it came in."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        got = b""
        while not got.endswith(until):
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        time.sleep(0.05)  # nothing more follows
        return got, data_segments(sock)


def test_a_response_written_in_one_step_is_one_segment(server: tuple[int, type]) -> None:
    port, protocol = server
    post = b"POST /job HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
    got, segments = exchange(port, post, b'"}')
    assert got.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert got.endswith(b'{"job_id":"' + b"x" * 32 + b'"}')
    assert segments == (1 if protocol is OneWriteProtocol else 2)


def test_what_a_later_step_writes_follows_in_order(server: tuple[int, type]) -> None:
    port, protocol = server
    got, segments = exchange(port, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n", b"0\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"a\r\nevent: a\n\n\r\na\r\nevent: b\n\n\r\n0\r\n\r\n"
    # headers with the first chunk; the second chunk with the end of the response
    assert segments == (2 if protocol is OneWriteProtocol else 4)


def test_large_writes_go_at_once_and_in_order(server: tuple[int, type]) -> None:
    """Writes past ``JOIN_BYTES`` are not held (uvicorn's flow control must see the socket
    as it is, tests/chaos/test_streams.py: a stalled reader): 4 MiB sent in one step arrive
    whole and in order."""
    port, _ = server
    got, _ = exchange(port, b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n", b"0\r\n\r\n")
    body = got.partition(b"\r\n\r\n")[2]
    chunks = [bytes([65 + i % 26]) * (64 << 10) for i in range(64)]
    assert body == b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
