"""All configuration, read from environment variables in one place.

Every setting is documented in the README's configuration table with its default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from app.core.images import MAX_PIXELS
from app.core.runner import BackendChoice
from app.serving.connections import IMPLEMENTATIONS, HttpImplementation


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroups: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may keep busy: those it may run on, capped by its cgroup's CPU quota
    (a container's `--cpus`, a platform's "0.1 CPU") rounded up; at least 1. `os.cpu_count()`
    counts the host's, and as many inference threads on a tenth of a CPU only take turns."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, own_cgroups)
    return max(1, min(count, math.ceil(quota)) if quota is not None else count)


def cgroup_cpu_quota(cgroup_root: Path, own_cgroups: Path) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup, v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`),
    None if there is none or it cannot be read."""
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        lines = []
    paths = {}  # controller ("" for v2) -> this process's cgroup below the root
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(","):
            paths[controller] = path.lstrip("/")
    candidates = [(cgroup_root / paths.get("", ""), "v2"), (cgroup_root, "v2"),
                  (cgroup_root / "cpu" / paths.get("cpu", ""), "v1"), (cgroup_root / "cpu", "v1")]
    for folder, version in candidates:
        try:
            if version == "v2":
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                return None if quota == "max" else int(quota) / int(period)
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota_us <= 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _number(value: str, name: str, kind: type, minimum: float) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return number


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_path: Path = Path("models/export.pkl")
    model_url: str | None = None
    model_sha256: str | None = None
    model_code: Path | None = None  # a Python file defining the functions the export refers to
    cache_dir: Path | None = None  # compiled models; default: the export's folder if writable
    max_upload_mb: float = 20
    fetch_timeout_s: float = 10
    allow_private_urls: bool = False
    log_level: str = "info"
    log_format: str = "text"
    # Inference tuning (see README "Performance"): threads for ONNX Runtime / torch, the largest
    # batch the worker forms from requests already waiting, and how many may wait before 503.
    threads: int = field(default_factory=usable_cpus)
    max_batch: int = 8
    queue_size: int = 64
    backend: BackendChoice = "auto"
    cors_origins: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS
    shutdown_timeout_s: float = 20
    # A request body that has not fully arrived this long after the request began gets 408 and
    # its connection closed: a slow client cannot hold a connection open (README, Slow clients).
    body_timeout_s: float = 60
    # A connection whose request line and headers have not all arrived this long after it opened,
    # or after its previous response, is closed (408 if a request line came; connections.py).
    header_timeout_s: float = 10
    http_implementation: HttpImplementation = "auto"  # uvicorn's HTTP parser: httptools if installed, or h11
    # Corrections from the page (README, "Improve it from use"): off unless FEEDBACK_DIR is set;
    # FEEDBACK_MAX_MB caps what that folder may hold, after which corrections are refused.
    feedback_dir: Path | None = None
    feedback_max_mb: float = 500

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def feedback_max_bytes(self) -> int:
        return int(self.feedback_max_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        def number(name: str, default, kind: type = float, minimum: float = 0):
            value = get(name)
            return default if value is None else _number(value, name, kind, minimum)

        log_format = (get("LOG_FORMAT") or defaults.log_format).lower()
        if log_format not in {"text", "json"}:
            raise ConfigError(f"LOG_FORMAT must be text or json, got {log_format!r}")
        backend = (get("INFERENCE_BACKEND") or defaults.backend).lower()
        if backend not in {"auto", "onnx", "torch"}:
            raise ConfigError(f"INFERENCE_BACKEND must be auto, onnx or torch, got {backend!r}")
        log_level = (get("LOG_LEVEL") or defaults.log_level).lower()
        if log_level not in {"critical", "error", "warning", "info", "debug"}:
            raise ConfigError(f"LOG_LEVEL must be one of critical, error, warning, info, debug, got {log_level!r}")
        sha = get("MODEL_SHA256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
            raise ConfigError("MODEL_SHA256 must be 64 hexadecimal digits")
        http_implementation = (get("HTTP_IMPLEMENTATION") or defaults.http_implementation).lower()
        if http_implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"HTTP_IMPLEMENTATION must be one of {', '.join(IMPLEMENTATIONS)}, "
                              f"got {http_implementation!r}")
        origins = tuple(o.strip() for o in (get("CORS_ORIGINS") or "").split(",") if o.strip())
        return cls(
            host=get("HOST") or defaults.host,
            port=number("PORT", defaults.port, int, 0),
            model_path=Path(get("MODEL_PATH") or defaults.model_path),
            model_url=get("MODEL_URL"),
            model_sha256=sha.lower() if sha else None,
            model_code=Path(get("MODEL_CODE")) if get("MODEL_CODE") else None,
            cache_dir=Path(get("CACHE_DIR")) if get("CACHE_DIR") else None,
            max_upload_mb=number("MAX_UPLOAD_MB", defaults.max_upload_mb, float, 0.001),
            fetch_timeout_s=number("FETCH_TIMEOUT_S", defaults.fetch_timeout_s, float, 0.1),
            allow_private_urls=_bool(get("ALLOW_PRIVATE_URLS") or "false", "ALLOW_PRIVATE_URLS"),
            log_level=log_level,
            log_format=log_format,
            threads=number("THREADS", defaults.threads, int, 1),
            max_batch=number("MAX_BATCH", defaults.max_batch, int, 1),
            queue_size=number("QUEUE_SIZE", defaults.queue_size, int, 1),
            backend=cast(BackendChoice, backend),
            cors_origins=origins,
            shutdown_timeout_s=number("SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s, float, 0),
            body_timeout_s=number("BODY_TIMEOUT_S", defaults.body_timeout_s, float, 0.1),
            header_timeout_s=number("HEADER_TIMEOUT_S", defaults.header_timeout_s, float, 0.1),
            http_implementation=cast(HttpImplementation, http_implementation),
            feedback_dir=Path(get("FEEDBACK_DIR")) if get("FEEDBACK_DIR") else None,
            feedback_max_mb=number("FEEDBACK_MAX_MB", defaults.feedback_max_mb, float, 0.001),
        )
