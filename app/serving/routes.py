"""The service's route handlers: thin, each a few lines over the classifier and the fetcher.

Their docstrings are the OpenAPI description (`/openapi.json`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.schemas import SchemaGenerator

from app.core.feedback import NONE_OF_THESE, FeedbackStore, parse_label, photo_to_keep
from app.core.images import ImageError
from app.serving.classifier import Classifier
from app.serving.config import Settings
from app.serving.fetch import AddressPolicy, FetchError, fetch_image_bytes, parse_url
from app.serving.startup import Serving
from app.web import STATIC_DIR, ApiError


@dataclass
class Runtime:
    """What the lifespan builds and the handlers use."""

    settings: Settings
    policy: AddressPolicy
    session: aiohttp.ClientSession
    feedback: FeedbackStore | None = None  # None: corrections are off
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
        description: Classes in vocab order, whether the model is multi-label (and its threshold; null
          for a single-label model), the model file's sha256 (for a bundle, its source
          export's), how it is served, whether the learner behind it is loaded yet (a restart serves
          a checked compiled model first; "not used" for a bundle), the bundle (its source export,
          versions and parity evidence; null when an export is served), its unfamiliar-image
          detector (method, threshold, validation false-flag rate; null if it has none), its
          model card, `precision` ("fp32", or "int8" for a quantized bundle, whose `bundle.agreement`
          says how close its answers are to the FP32 model's), `activation` (what turns the model's
          outputs into the probabilities answered, softmax or sigmoid), `raw_scores` (true when the
          learner's loss has no activation, so learn.predict gives raw scores, and the answers are
          their softmax), and whether this server keeps corrections (`feedback`, see POST /feedback).
      503:
        description: The model is not loaded yet.
    """
    serving = ready_serving(request)
    model = serving.classifier.model
    return JSONResponse({
        "classes": model.vocab,
        "multi_label": model.predictor.threshold is not None,
        "threshold": model.predictor.threshold,
        "file": model.file.path.name,
        "sha256": model.file.sha256,
        "backend": model.predictor.backend,
        "preprocessing": model.predictor.preprocessing,
        "precision": serving.precision,
        "activation": model.predictor.activation,
        "raw_scores": model.predictor.raw_scores,
        "learner": serving.learner_status(),
        "bundle": serving.bundle.describe() if serving.bundle else None,
        "detector": model.detector.describe() if model.detector else None,
        "card": model.file.card,
        "feedback": runtime(request).feedback is not None,
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
          looks like none of the training photos, so no class should be trusted). A multi-label model
          (GET /model: "multi_label": true) gives each class its own sigmoid probability, and adds
          "labels" (every class above "threshold", as learn.predict decodes them) and "threshold".'
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
    return JSONResponse(await classify_remote(request, fetcher(request, url)))


def fetcher(request: Request, url: str) -> Callable[[], Awaitable[bytes]]:
    rt = runtime(request)
    return lambda: fetch_image_bytes(rt.session, url, rt.policy, rt.settings.max_upload_bytes,
                                     rt.settings.fetch_timeout_s)


async def classify_remote(request: Request, fetch: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
    """Classify what `fetch` gets from a remote server: an answer that is not an image is the
    remote's fault (502), not the client's."""
    try:
        return await ready_classifier(request).classify(fetch)
    except ImageError as exc:
        if exc.code == "unsupported_image":
            message = f"The URL did not return an image we can read. {exc.message}"
            raise FetchError("remote_not_image", message) from None
        raise


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
          looks like none of the training photos, so no class should be trusted). A multi-label model
          (GET /model: "multi_label": true) gives each class its own sigmoid probability, and adds
          "labels" (every class above "threshold", as learn.predict decodes them) and "threshold".'
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


async def feedback(request: Request) -> JSONResponse:
    """
    summary: Keep a photo and the answer it should have had, to improve the model (only when the
      operator has set FEEDBACK_DIR; see README "Improve it from use").
    description: The photo is classified again and kept re-encoded without any metadata (no EXIF,
      GPS, XMP, ICC profile or comment; orientation applied first), with the chosen label, the
      model's answer, the model's sha256, the unfamiliar flag and the time, under a name the server
      makes.
    requestBody:
      required: true
      content:
        multipart/form-data:
          schema:
            type: object
            required: [label]
            properties:
              label:
                type: string
                description: One of the classes in GET /model, or "none of these".
              file:
                type: string
                format: binary
                description: The photo (or give url instead).
              url:
                type: string
                description: http(s) address of the photo, fetched as GET /classify-url does.
    responses:
      201:
        description: '{"id": name, "label": label, "predictions": [...], "unfamiliar": ...}: kept; the id
          lets the operator find (and delete) it.'
      400:
        description: Not multipart, or neither (or both of) file and url.
      404:
        description: This server does not keep corrections (FEEDBACK_DIR is not set).
      413:
        description: The upload or the image is too large.
      415:
        description: Not an image we can decode.
      422:
        description: The label is not one of the model's classes nor "none of these".
      502:
        description: The url's server failed or did not send an image.
      503:
        description: Not ready, or too busy (see Retry-After).
      504:
        description: The url's server timed out.
      507:
        description: The space for corrections is full (FEEDBACK_MAX_MB or the disk); nothing kept
          is lost.
    """
    rt = runtime(request)
    if rt is None or rt.feedback is None:
        raise ApiError(404, "feedback_off", "This server does not keep corrections.")
    classifier = ready_classifier(request)
    received: list[bytes] = []
    async with request.form(max_files=1, max_fields=16) as form:
        label = parse_label(form.get("label"), classifier.model.vocab)
        file, url = form.get("file"), form.get("url")
        if isinstance(file, UploadFile) == isinstance(url, str):
            raise ApiError(400, "missing_file", "Send the photo as a multipart/form-data field named 'file', or "
                                                "its address as a field named 'url' (one of them).")
        remote = not isinstance(file, UploadFile)
        read = fetcher(request, parse_url(url)) if remote else file.read

        async def read_and_keep() -> bytes:
            received.append(await read())
            return received[-1]

        sha256 = classifier.model.file.sha256  # the model classify() answers with: no await in between
        result = await (classify_remote(request, read_and_keep) if remote else classifier.classify(read_and_keep))
    data = received[0]
    photo = await asyncio.to_thread(photo_to_keep, data, rt.settings.max_pixels)
    correction = await asyncio.to_thread(rt.feedback.keep, photo, label, result["predictions"],
                                         result.get("unfamiliar"), sha256)
    chosen = label if label is not None else NONE_OF_THESE
    request.app.state.metrics.corrections.labels(chosen).inc()
    return JSONResponse({"id": correction.name, "label": chosen,
                         "predictions": result["predictions"], "unfamiliar": result.get("unfamiliar")},
                        status_code=201)


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


SCHEMAS = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "Cuddle or Not", "version": "1.0.0"}})


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))
