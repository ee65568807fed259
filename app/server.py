"""The Starlette application: routes, start-up and the middleware every request passes through.

Handlers stay thin: decoding, fetching and prediction live in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.classifier import Classifier
from app.config import Settings
from app.errors import ApiError, error_response
from app.fetch import AddressPolicy, allow_any, fetch_image_bytes, make_session, parse_url, public_only
from app.metrics import Metrics
from app.model_store import ModelLoadError
from app.startup import Serving, start_serving

log = logging.getLogger("app")
access_log = logging.getLogger("app.access")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_OVERHEAD = 64 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Runtime:
    """What the lifespan builds and the handlers use."""

    settings: Settings
    policy: AddressPolicy
    session: aiohttp.ClientSession
    serving: Serving | None = None


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def ready_serving(request: Request) -> Serving:
    rt = request.app.state.runtime
    serving = rt.serving if rt is not None else None
    if serving is None or not request.app.state.ready:
        raise ApiError(503, "not_ready", "The model is not loaded yet; try again shortly.", {"Retry-After": "5"})
    return serving


def ready_classifier(request: Request) -> Classifier:
    return ready_serving(request).classifier


# --- Routes --------------------------------------------------------------------------------------


async def healthz(request: Request) -> JSONResponse:
    """
    responses:
      200:
        description: The process is running.
    """
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """
    responses:
      200:
        description: The model is loaded and requests are being served.
      503:
        description: Starting up or shutting down.
    """
    ready_serving(request)
    return JSONResponse({"status": "ready"})


async def model_info(request: Request) -> JSONResponse:
    """
    responses:
      200:
        description: Classes in vocab order, the model file's sha256, how it is served, whether the
          learner behind it is loaded yet (a restart serves a checked compiled model first), its
          unfamiliar-image detector (method, threshold, validation false-flag rate; null if it has
          none), and its model card.
      503:
        description: The model is not loaded yet.
    """
    serving = ready_serving(request)
    classifier = serving.classifier
    return JSONResponse({
        "classes": classifier.vocab,
        "file": classifier.file.path.name,
        "sha256": classifier.file.sha256,
        "backend": classifier.predictor.backend,
        "preprocessing": classifier.predictor.preprocessing,
        "learner": serving.learner,
        "detector": classifier.detector.describe() if classifier.detector else None,
        "card": classifier.file.card,
    })


async def classify_url(request: Request) -> JSONResponse:
    """
    parameters:
      - name: url
        in: query
        required: true
        description: http(s) address of a JPEG, PNG, WebP, GIF or HEIC image.
        schema:
          type: string
    responses:
      200:
        description: '{"predictions": [[label, probability], ...]}, every class, highest first; with
          "unfamiliar": true|false when the model has an unfamiliar-image detector (true: the photo
          looks like none of the training photos, so no class should be trusted).'
      400:
        description: Missing or malformed URL.
      403:
        description: The URL points at a private, loopback or otherwise non-public address.
      413:
        description: The image is too large.
      502:
        description: The remote server failed or did not send an image.
      503:
        description: Not ready, or too busy (see Retry-After).
      504:
        description: The remote server timed out.
    """
    url = parse_url(request.query_params.get("url"))
    classifier = ready_classifier(request)
    rt = runtime(request)

    def fetch() -> Awaitable[bytes]:
        return fetch_image_bytes(rt.session, url, rt.policy, rt.settings.max_upload_bytes, rt.settings.fetch_timeout_s)

    try:
        result = await classifier.classify(fetch)
    except ApiError as exc:
        if exc.status == 415:  # the remote server's fault, not the client's
            message = f"The URL did not return an image we can read. {exc.message}"
            raise ApiError(502, "remote_not_image", message) from None
        raise
    return JSONResponse(result)


async def upload(request: Request) -> JSONResponse:
    """
    requestBody:
      required: true
      content:
        multipart/form-data:
          schema:
            type: object
            required: [file]
            properties:
              file:
                type: string
                format: binary
    responses:
      200:
        description: '{"predictions": [[label, probability], ...]}, every class, highest first; with
          "unfamiliar": true|false when the model has an unfamiliar-image detector (true: the photo
          looks like none of the training photos, so no class should be trusted).'
      400:
        description: Not multipart, or no field named file.
      413:
        description: The upload or the image is too large.
      415:
        description: Not an image we can decode.
      503:
        description: Not ready, or too busy (see Retry-After).
    """
    classifier = ready_classifier(request)
    async with request.form(max_files=1, max_fields=16) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ApiError(400, "missing_file", "Send the photo as a multipart/form-data field named 'file'.")
        result = await classifier.classify(file.read)
    return JSONResponse(result)


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


schemas = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "Cuddle or Not", "version": "1.0.0"}})


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(schemas.get_schema(routes=request.app.routes))


# --- Errors --------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
    message = exc.detail if exc.status_code == 400 else {404: "No such page.", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail))
    return error_response(exc.status_code, codes.get(exc.status_code, "error"), message, dict(exc.headers or {}))


async def on_body_too_large(request: Request, exc: Exception) -> Response:
    limit = request.app.state.settings.max_upload_mb
    return error_response(413, "upload_too_large", f"The upload is larger than {limit:g} MB.", {"Connection": "close"})


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    return error_response(400, "client_disconnected", "The upload was interrupted.")


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response, so uvicorn logs the traceback once.
    return error_response(500, "internal_error", "Something went wrong on our side.")


# --- Middleware ----------------------------------------------------------------------------------


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
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
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


# --- Application ---------------------------------------------------------------------------------


def create_app(settings: Settings, policy: AddressPolicy | None = None,
               resolver: AbstractResolver | None = None) -> Starlette:
    """The application. `policy` and `resolver` decide which fetch destinations are allowed
    (default: public addresses only, or any with ALLOW_PRIVATE_URLS)."""
    policy = policy or (allow_any if settings.allow_private_urls else public_only)
    metrics_ = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.runtime = Runtime(settings, policy, make_session(policy, settings.fetch_timeout_s, resolver))
        try:
            serving = await start_serving(settings, metrics_)
        except ModelLoadError as exc:
            app.state.startup_error = f"cannot serve the model: {exc}"
            await app.state.runtime.session.close()
            raise
        app.state.runtime.serving = serving
        app.state.ready = True
        classifier = serving.classifier
        learner = ("learner loading in the background; serving the compiled model checked on an earlier start"
                   if serving.learner == "loading" else "learner loaded")
        log.info("ready: %s (%s, %s preprocessing, %s) classes=%s", classifier.file.path, classifier.predictor.backend,
                 classifier.predictor.preprocessing, learner, classifier.vocab)
        try:
            yield
        finally:
            app.state.ready = False
            await serving.stop()
            await app.state.runtime.session.close()

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/model", model_info),
        Route("/classify-url", classify_url),
        Route("/upload", upload, methods=["POST"]),
        Route("/metrics", metrics, include_in_schema=False),
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/", index, include_in_schema=False),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [
        Middleware(RequestLog, metrics=metrics_, routes=frozenset(r.path for r in routes if isinstance(r, Route))),
        Middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD),
    ]
    if settings.cors_origins:  # outside the size limit, so that its 413 carries CORS headers too
        middleware.insert(1, Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                        allow_methods=["GET", "POST"], expose_headers=["X-Request-ID"]))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_exception,
            BodyTooLarge: on_body_too_large,
            ClientDisconnect: on_client_disconnect,
            Exception: on_unexpected,
        },
    )
    app.state.ready = False
    app.state.settings = settings
    app.state.metrics = metrics_
    app.state.runtime = None
    return app
