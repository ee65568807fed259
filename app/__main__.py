"""`python -m app`: serve the model with uvicorn, configured from the environment."""

from __future__ import annotations

import signal
import sys

import uvicorn

from app.config import ConfigError, Settings
from app.logs import configure_logging
from app.server import create_app


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # uvicorn re-raises the SIGTERM it handled once it has drained requests; with a Python handler
    # in place that re-raise is a no-op, so a graceful shutdown exits 0 instead of "killed".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
