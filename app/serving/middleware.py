"""The middleware every request passes through: the request log with its metrics, the upload size
limit (streamed, with a bounded lingering drain so clients can read their 413) and the deadline
for a request body to arrive."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.errors import BodyTimeout, BodyTooLarge
from app.serving.metrics import Metrics
from app.web import error_response

access_log = logging.getLogger(f"{__name__}.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def carries_body(scope: Scope) -> bool:
    """An HTTP request of a method that sends a body: the ones the body limits apply to."""
    return scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH")


class UploadSizeLimit:
    """Refuse bodies over the limit while they stream in, before they are held anywhere, and make
    sure the client can read that 413.

    Most HTTP clients send the whole body before reading the answer. A server that answers and
    closes while body bytes are still arriving makes the kernel reset the connection, and the
    client sees "connection reset" instead of the 413. So, as nginx's "lingering close" does, the
    rest of the body is read and thrown away before the response is finished and the connection
    closed, within bounds: at most `DRAIN_FACTOR` times the limit in bytes (reading costs no
    memory, but is not free), `DRAIN_SECONDS` in all and `DRAIN_IDLE_SECONDS` without a byte, so
    that a slow client cannot hold a connection for longer. A client that waits for
    `100 Continue` has sent nothing and is told 413 at once.
    """

    DRAIN_FACTOR = 4
    DRAIN_SECONDS = 10.0
    DRAIN_IDLE_SECONDS = 2.0

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not carries_body(scope):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        waits_for_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        received = 0
        too_large = False

        async def send_then_drain(message: Message) -> None:
            # The whole answer goes out first; the last (empty) part, which lets the server close
            # the connection, only once the client's body has been read.
            if message["type"] == "http.response.body" and not message.get("more_body") and too_large:
                await send({**message, "more_body": True})
                if not (waits_for_continue and received == 0):
                    await self._drain(receive, declared, received)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "bad_request", "Invalid Content-Length.")(scope, receive, send)
            if int(declared) > self.max_bytes:
                too_large = True
                return await error_response(413, "upload_too_large",
                                            f"The upload is larger than {self.max_bytes // (1024 * 1024)} MB.",
                                            {"Connection": "close"})(scope, receive, send_then_drain)

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send_then_drain)

    async def _drain(self, receive: Receive, declared: bytes | None, received: int) -> None:
        budget = self.DRAIN_FACTOR * self.max_bytes
        if declared is not None and int(declared) > budget:
            return  # more than we would read anyway: close at once
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.DRAIN_SECONDS
        while received <= budget:
            timeout = min(self.DRAIN_IDLE_SECONDS, deadline - loop.time())
            if timeout <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class BodyDeadline:
    """A request body must have arrived within `seconds` of the request's start: past that, reading
    it raises `BodyTimeout` (408, connection closed). No other server timeout applies to a body
    still arriving, so without this a thousand clients trickling a byte a second would hold a
    thousand connections and their buffers for as long as they liked."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not carries_body(scope):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def receive_in_time() -> Message:
            nonlocal complete
            if complete:
                return await receive()  # the body is in; what follows is a disconnect, whenever it comes
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeout() from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)


class RequestLog:
    """One log line per request (method, path, status, milliseconds, bytes received, request id), the request id
    echoed in X-Request-ID, and the per-route request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, _one_line_startup_failure(scope, send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            ms = (time.perf_counter() - start) * 1000
            path = scope["path"]
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(ms / 1000)
            length = headers.get(b"content-length", b"0")
            bytes_in = int(length) if length.isdigit() else 0
            access_log.info("%s %s %d %.1fms in=%dB id=%s", scope["method"], path, status, ms, bytes_in, request_id,
                            extra={"request_id": request_id, "method": scope["method"], "path": path,
                                   "status": status, "ms": round(ms, 1), "bytes_in": bytes_in})


def _one_line_startup_failure(scope: Scope, send: Send) -> Send:
    """Starlette reports a failed lifespan with a full traceback; a model that cannot load is an
    operator's problem with a one-line explanation, so report that line instead."""

    async def send_failure_line(message: Message) -> None:
        reason = getattr(scope["app"].state, "startup_error", None)
        if message["type"] == "lifespan.startup.failed" and reason:
            message = {**message, "message": reason}
        await send(message)

    return send_failure_line
