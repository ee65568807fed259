"""The Starlette application: its routes, middleware and error handlers, and the lifespan that
starts the model (`app.serving.startup`) before the first request, reloads it on SIGHUP, and stops
it after the last."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp.abc import AbstractResolver
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app.core.feedback import FeedbackStore
from app.core.model_file import ModelLoadError
from app.serving import routes
from app.serving.config import Settings
from app.serving.errors import EXCEPTION_HANDLERS
from app.serving.fetch import AddressPolicy, allow_any, make_session, public_only
from app.serving.metrics import Metrics
from app.serving.middleware import BodyDeadline, RequestLog, UploadSizeLimit
from app.serving.routes import Runtime
from app.serving.startup import LearnerState, Serving, reload, start_serving
from app.web import STATIC_DIR

log = logging.getLogger(__name__)

# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_OVERHEAD = 64 * 1024


class ReloadOnSighup:
    """`kill -HUP`: load MODEL_PATH again and switch to it (`app.serving.startup.reload`), one
    reload at a time; a signal during a reload runs another once it is done. Signals reach only an
    app served from the main thread (as `python -m app` serves it)."""

    def __init__(self, serving: Serving, settings: Settings, metrics: Metrics):
        self.serving, self.settings, self.metrics = serving, settings, metrics
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()
        try:
            self.loop.add_signal_handler(signal.SIGHUP, self.schedule)
            self.installed = True
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (an embedding app)
            self.installed = False

    def schedule(self) -> None:
        log.info("SIGHUP: reloading %s", self.settings.model_path)
        task = self.loop.create_task(self.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        async with self.lock:
            await reload(self.serving, self.settings, self.metrics)

    async def stop(self) -> None:
        if self.installed:
            self.loop.remove_signal_handler(signal.SIGHUP)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def create_app(settings: Settings, policy: AddressPolicy | None = None,
               resolver: AbstractResolver | None = None) -> Starlette:
    """The application. `policy` and `resolver` decide which fetch destinations are allowed
    (default: public addresses only, or any with ALLOW_PRIVATE_URLS)."""
    policy = policy or (allow_any if settings.allow_private_urls else public_only)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feedback = FeedbackStore(settings.feedback_dir, settings.feedback_max_bytes) if settings.feedback_dir else None
        app.state.runtime = Runtime(settings, policy, make_session(policy, settings.fetch_timeout_s, resolver),
                                    feedback)
        try:
            serving = await start_serving(settings, metrics)
        except ModelLoadError as exc:
            app.state.startup_error = f"cannot serve the model: {exc}"
            await app.state.runtime.session.close()
            raise
        app.state.runtime.serving = serving
        app.state.ready = True
        model = serving.classifier.model
        learner = {LearnerState.LOADING: "learner loading in the background; serving the compiled model checked "
                                         "on an earlier start",
                   LearnerState.NOT_USED: "a checked bundle, no learner"}.get(serving.learner, "learner loaded")
        log.info("ready: %s (%s, %s preprocessing, %s) classes=%s precision=%s threads=%d", model.file.path,
                 model.predictor.backend, model.predictor.preprocessing, learner, model.vocab, serving.precision,
                 settings.threads)
        reloading = ReloadOnSighup(serving, settings, metrics)
        try:
            yield
        finally:
            app.state.ready = False
            await reloading.stop()
            await serving.stop()
            await app.state.runtime.session.close()

    route_table = [
        Route("/healthz", routes.healthz),
        Route("/readyz", routes.readyz),
        Route("/model", routes.model_info),
        Route("/classify-url", routes.classify_url),
        Route("/upload", routes.upload, methods=["POST"]),
        Route("/feedback", routes.feedback, methods=["POST"]),
        Route("/metrics", routes.metrics, include_in_schema=False),
        Route("/openapi.json", routes.openapi, include_in_schema=False),
        Route("/", routes.index, include_in_schema=False),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    paths = frozenset(r.path for r in route_table if isinstance(r, Route))
    middleware = [
        Middleware(RequestLog, metrics=metrics, routes=paths),
        Middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD),
        Middleware(BodyDeadline, seconds=settings.body_timeout_s),
    ]
    if settings.cors_origins:  # outside the size limit, so that its 413 carries CORS headers too
        middleware.insert(1, Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                        allow_methods=["GET", "POST"], expose_headers=["X-Request-ID"]))
    app = Starlette(routes=route_table, middleware=middleware, lifespan=lifespan,
                    exception_handlers=dict(EXCEPTION_HANDLERS))
    app.state.ready = False
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    return app
