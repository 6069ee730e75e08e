"""Redis connections with TCP keep-alive probes (``store.tcp_options``), the workers' and the
API's alike: a connection whose Redis vanished without closing it (a lost node, a failover to
a new address) then fails within about a minute, instead of leaving a read with no timeout
(RQ's dequeue, the SSE readers' wait) blocked for the kernel's two hours."""

from __future__ import annotations

import asyncio
import socket

from service import store
from service.api.deps import AsyncClients


def _probes(sock: socket.socket) -> tuple[int, int]:
    on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return on, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)


def test_the_workers_connections_send_keepalive_probes(redis_url: str) -> None:
    r = store.connect(redis_url, patient=True)
    r.ping()
    (conn,) = r.connection_pool._available_connections
    assert _probes(conn._sock) == (1, 30)


def test_the_apis_connections_send_keepalive_probes(redis_url: str) -> None:
    async def check() -> list[tuple[int, int]]:
        clients = AsyncClients(redis_url, {"hub": {"single_connection_client": True}})
        try:
            found = []
            for purpose in ("sse", "hub"):
                client = clients.get(purpose)
                await client.ping()
                conn = client.connection or client.connection_pool._available_connections[0]
                found.append(_probes(conn._writer.get_extra_info("socket")))
            return found
        finally:
            await clients.aclose()

    assert asyncio.run(check()) == [(1, 30), (1, 30)]


def test_a_unix_socket_url_takes_no_tcp_settings() -> None:
    assert store.tcp_options("unix:///run/redis.sock") == {}
