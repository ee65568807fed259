"""What the project's two Starlette apps (the service and the review page of `app.clean`) share:
the JSON error shape, the mapping of domain errors to statuses, the static folder, and taking
their listening socket before anything is printed.

Errors are `{"error": {"code": ..., "message": ...}}` with the status that says whose fault it is.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.core.errors import DomainError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

Handler = Callable[[Request, Exception], Awaitable[Response]]


class ApiError(Exception):
    """An HTTP answer a route handler gives up with (not ready, a missing form field): the few
    errors that are about HTTP itself. Everything else is a `DomainError` mapped at the edge."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=dict(headers) if headers else None)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
HTTP_MESSAGES = {404: "No such page.", 405: "Method not allowed."}


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (and 400s from parsing), in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code == 400 else HTTP_MESSAGES.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "error"), message,
                          dict(exc.headers or {}))


def domain_error_handler(statuses: Mapping[str, int], headers: Mapping[str, Mapping[str, str]] | None = None,
                         default: int = 400) -> Handler:
    """An exception handler answering each `DomainError` with the status its code maps to (and
    any headers that code carries, such as Retry-After)."""

    async def on_domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DomainError)
        return error_response(statuses.get(exc.code, default), exc.code, exc.message, (headers or {}).get(exc.code))

    return on_domain_error


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, for uvicorn to serve on. Bound by us, first, so that a busy
    port is a one-line error naming the setting to change (the caller's words), not uvicorn's log
    after a URL was printed; `OSError` if it cannot be had."""
    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
