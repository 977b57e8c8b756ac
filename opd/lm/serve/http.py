"""How `opd serve` speaks HTTP: uvicorn on h11, with limits on what one connection may hold.

uvicorn closes idle keep-alive connections, caps a request head's size (h11) and the number of open connections, but
sets no deadline on *receiving* a request: a client that connects and sends nothing, or dribbles its head or body a
byte at a time, holds a connection (and one of `--max-connections` slots) for ever. `ReadDeadlineProtocol` closes a
connection whose request has not fully arrived `--read-timeout` seconds after the connection opened or the request's
first byte came, as nginx's `client_header_timeout` and `client_body_timeout` do.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from opd.args import ServeArgs

log = logging.getLogger("opd.serve")

_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
"""The client's h11 states in which its request has arrived whole (or the connection is over)."""


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request (`read_timeout` seconds, set by
    `read_deadline_protocol`)."""

    read_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self.arm_read_deadline()  # a client that connects and never writes

    def data_received(self, data: bytes) -> None:
        if self.read_deadline is None and self.conn.their_state is h11.IDLE:
            self.arm_read_deadline()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in _RECEIVED:
            self.cancel_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_read_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request already buffered is handled in the call above; any part of it still missing is owed
        if self.conn.their_state not in _RECEIVED and self.conn.their_state is not h11.IDLE:
            self.arm_read_deadline()

    def arm_read_deadline(self) -> None:
        self.cancel_read_deadline()
        self.read_deadline = self.loop.call_later(self.read_timeout, self.read_deadline_passed)

    def cancel_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def read_deadline_passed(self) -> None:
        self.read_deadline = None
        if self.conn.their_state in _RECEIVED or self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        log.warning("closed the connection of %s: its request did not arrive within --read-timeout %gs", client,
                    self.read_timeout)
        self.transport.close()  # a handler waiting on the body sees the client disconnect


def read_deadline_protocol(seconds: float) -> type[ReadDeadlineProtocol]:
    """`ReadDeadlineProtocol` with a deadline of `seconds` (uvicorn builds the protocol itself, from its class)."""
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), {"read_timeout": seconds})


def uvicorn_config(app, args: ServeArgs, **overrides):
    """How uvicorn serves `app`: h11 with a cap on a request's head (httptools takes megabytes of headers), a deadline
    on receiving each request, a bound on open connections (503 above it) and idle keep-alive connections closed after
    a few seconds."""
    import uvicorn

    settings = dict(host=args.host, port=args.port, log_level="info", http=read_deadline_protocol(args.read_timeout),
                    h11_max_incomplete_event_size=args.max_header_bytes, limit_concurrency=args.max_connections,
                    timeout_keep_alive=5)
    return uvicorn.Config(app, **{**settings, **overrides})
