"""The one place where the service turns domain errors into HTTP answers.

Statuses say whose fault it is: 4xx for what a client sent, 502/504 only when a remote image
server failed us, 503 when we are not ready or too busy (with Retry-After).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.core.errors import DomainError
from app.web import ApiError, Handler, domain_error_handler, error_response, on_api_error, on_http_exception

STATUSES = {
    # app.core.images.ImageError
    "unsupported_image": 415,
    "image_too_large": 413,
    # app.serving.fetch.FetchError
    "missing_url": 400,
    "invalid_url": 400,
    "destination_not_allowed": 403,
    "remote_error": 502,
    "remote_not_image": 502,
    "remote_unreachable": 502,
    "too_many_redirects": 502,
    "remote_timeout": 504,
    # app.serving.batcher.Overloaded
    "overloaded": 503,
    # app.core.feedback.FeedbackError
    "bad_label": 422,
    "feedback_full": 507,
    "feedback_unwritable": 507,
}
HEADERS = {"overloaded": {"Retry-After": "1"}}


class BodyTooLarge(Exception):
    """A request body grew past the upload limit while it streamed in (`UploadSizeLimit`)."""


class BodyTimeout(Exception):
    """A request body did not arrive within BODY_TIMEOUT_S (`BodyDeadline`)."""


async def on_body_too_large(request: Request, exc: Exception) -> Response:
    limit = request.app.state.settings.max_upload_mb
    return error_response(413, "upload_too_large", f"The upload is larger than {limit:g} MB.", {"Connection": "close"})


async def on_body_timeout(request: Request, exc: Exception) -> Response:
    limit = request.app.state.settings.body_timeout_s
    return error_response(408, "request_timeout", f"The request body did not arrive within {limit:g} s.",
                          {"Connection": "close"})


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    return error_response(400, "client_disconnected", "The upload was interrupted.")


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response, so uvicorn logs the traceback once.
    return error_response(500, "internal_error", "Something went wrong on our side.")


EXCEPTION_HANDLERS: dict[type[Exception], Handler] = {
    DomainError: domain_error_handler(STATUSES, HEADERS, default=400),
    ApiError: on_api_error,
    HTTPException: on_http_exception,
    BodyTooLarge: on_body_too_large,
    BodyTimeout: on_body_timeout,
    ClientDisconnect: on_client_disconnect,
    Exception: on_unexpected,
}
