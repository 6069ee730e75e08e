"""uvicorn's HTTP protocol with one socket write per event-loop step.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body at ``http.response.body``: two writes, two TCP segments
on a connection with ``TCP_NODELAY``, and two wake-ups of a client that waits for the whole
answer (a 202 is both at once). On loopback a write also does the receiving side's work in
the writer's system call: profiled under ``bench.service``, the header write alone was about a
fifth of the API's CPU. Here the writes a response makes in one step of the event loop (the
headers and the body of a 202, an event stream's headers and first events) are joined and
leave as one write when the step ends, so nothing waits longer than the code that runs in
that step; a close or an abort still comes after what was written before it. Only small
writes wait (``JOIN_BYTES``): a larger one goes at once with what is held before it, so
that uvicorn's flow control, which pauses a response's sends while the socket is full, sees
the socket as it is (an event stream sends many chunks in one step, and a client that
stopped reading would have had them all held here)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Writes are held while together they stay under this: a response's headers and a small
# body (a 202, an event stream's first events) leave as one.
JOIN_BYTES = 16 << 10


class _Joined:
    """A transport whose small writes in one loop step go to the socket as one write, at
    the end of the step (``call_soon``), or with the first write that takes them past
    ``JOIN_BYTES``; everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []
        self._size = 0  # bytes held

    def write(self, data: bytes) -> None:
        if self._size + len(data) >= JOIN_BYTES:
            self._held.append(data)
            self._flush()
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)
        self._size += len(data)

    def writelines(self, chunks: Any) -> None:
        for data in chunks:
            self.write(data)

    def _flush(self) -> None:
        held, self._held, self._size = self._held, [], 0
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what ``http="auto"`` picks where httptools is
    installed, as it is with the service) on a ``_Joined`` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Joined(transport, self.loop))  # type: ignore[arg-type]
