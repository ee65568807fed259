"""`python -m app`: serve the model with uvicorn, configured from the environment.

`python -m app --check` loads the model as a first start of the server would (compiling its ONNX
copy and recording that it answers like the learner, so that later starts are fast), then exits:
0 if it can be served, 3 with the one-line reason if not. The Dockerfile runs it so a broken model
fails the image build.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvicorn

from app.core.files import ensure_matplotlib_config_dir, writable
from app.core.logs import configure_logging
from app.core.model_file import ModelLoadError
from app.serving.app import create_app
from app.serving.config import ConfigError, Settings
from app.serving.connections import protocol_class
from app.serving.metrics import Metrics
from app.serving.startup import Serving, start_serving, still_loading_a_learner
from app.web import listen

STARTUP_FAILURE = 3  # uvicorn's exit status when the application fails to start


def check(settings: Settings) -> int:
    async def load() -> Serving:
        serving = await start_serving(settings, Metrics(), fast_start=False)
        await serving.stop()
        return serving

    try:
        serving = asyncio.run(load())
    except ModelLoadError as exc:
        print(f"cannot serve the model: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    model = serving.classifier.model
    print(f"ok: {settings.model_path} classes={model.vocab} backend={model.predictor.backend} "
          f"precision={serving.precision}")
    return 0


def main(argv: list[str]) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    ensure_matplotlib_config_dir()
    if settings.model_url and not settings.model_sha256:
        logging.getLogger(__name__).warning(
            "MODEL_URL is set without MODEL_SHA256: loading an export runs the code it contains, so pin the "
            "export you trust with MODEL_SHA256")
    if argv == ["--check"]:
        return check(settings)
    if settings.feedback_dir and not writable(settings.feedback_dir):
        print(f"error: FEEDBACK_DIR {settings.feedback_dir} cannot be created or written to by this user",
              file=sys.stderr)
        return 2
    if argv:
        print("usage: python -m app [--check]  (configuration comes from environment variables)", file=sys.stderr)
        return 2
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}): set PORT (or HOST) "
              "to a free one", file=sys.stderr)
        return 2
    # uvicorn re-raises the SIGTERM it handled once it has drained requests; with a Python handler
    # in place that re-raise is a no-op, so a graceful shutdown exits 0 instead of "killed".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings),
        http=protocol_class(settings.http_implementation, settings.header_timeout_s),
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    ))
    server.run(sockets=[sock])
    if not server.started:
        return STARTUP_FAILURE  # the lifespan logged its one-line reason
    if still_loading_a_learner():
        # Stopped (requests drained, lifespan done) while the learner was still loading in the
        # background: nothing it would produce is needed, and a shutdown must not wait for it.
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
