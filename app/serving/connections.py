"""A deadline for each request's line and headers, in both of uvicorn's HTTP parsers.

uvicorn closes a keep-alive connection that stays silent after a response, and times nothing else
before a request's headers are in: a connection that is opened and left silent, or that sends its
headers a byte at a time, is held for as long as the client likes, and a few hundred of them are
the cheapest way to exhaust a small instance (README, Slow clients). Here a connection must have
sent a whole request line and its headers within `HEADER_TIMEOUT_S` of opening, or of its previous
response finishing; otherwise it is closed, with a 408 when a request line had arrived (a client
that sent nothing is owed no answer). Once a request's headers are in, its body has its own
deadline (`middleware.BodyDeadline`) and a slow response none.

The deadline is a mixin over uvicorn's own protocol classes, so httptools and h11 behave the same:
it watches only what both expose (`cycle`, the request being answered, which a parser replaces
when a new request's headers are complete, and `on_response_complete`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal, cast

log = logging.getLogger(__name__)

HttpImplementation = Literal["auto", "httptools", "h11"]
IMPLEMENTATIONS: tuple[HttpImplementation, ...] = ("auto", "httptools", "h11")

# Enough of what arrived before the deadline to tell whether a request line was among it.
_PEEK_BYTES = 8192
_BODY = json.dumps({"error": {"code": "header_timeout",
                              "message": "The request's headers did not arrive in time."}}).encode()
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY))


class HeaderDeadline:
    """Mixed in before a uvicorn HTTP protocol class: closes a connection whose next request's
    headers have not all arrived `header_timeout_s` after it opened or after its last response."""

    header_timeout_s: float = 10.0
    # Provided by the uvicorn protocol class this is mixed into.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    _timer: asyncio.TimerHandle | None = None
    _waiting_after: Any = None  # the request answered last: a new `cycle` means new headers are in
    _head: bytes = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None and len(self._head) < _PEEK_BYTES:
            self._head += data[:_PEEK_BYTES - len(self._head)]
        super().data_received(data)  # type: ignore[misc]
        if self._timer is not None and self.cycle is not self._waiting_after:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # A pipelined request already read has become `cycle` by now, and is being answered.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._head = b""
        self._timer = self.loop.call_later(self.header_timeout_s, self._on_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        request_line = b"\n" in self._head.lstrip(b"\r\n") or len(self._head) >= _PEEK_BYTES
        if request_line:
            self.transport.write(TIMEOUT_RESPONSE)
        log.debug("closed a connection whose headers did not arrive within %gs (%s)", self.header_timeout_s,
                  "408" if request_line else "nothing sent")
        self.transport.close()


def protocol_class(implementation: HttpImplementation, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for `implementation` (`auto`: uvicorn's own choice, httptools when
    it is installed), with the header deadline."""
    base: type
    if implementation == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    elif implementation == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base
    return cast(type[asyncio.Protocol],
                type(f"HeaderDeadline{base.__name__}", (HeaderDeadline, base), {"header_timeout_s": header_timeout_s}))
