"""Getting the configured export onto disk: MODEL_PATH, or a download from MODEL_URL first,
checked (`app.core.model_file`) before anything loads it."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import aiohttp

from app.core.model_file import ModelFile, ModelLoadError, html_error, looks_like_html, open_model_file, sha_error

log = logging.getLogger(__name__)


async def download_model(url: str, dest: Path, expected_sha256: str | None = None, timeout_s: float = 600) -> None:
    """Download `url` to `dest` via a temporary file, renamed into place only when complete and
    checked, so a crash or a wrong link never leaves a half-written or bogus model behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading model from %s", url)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        raise ModelLoadError(f"downloading MODEL_URL {url} failed: HTTP {resp.status}")
                    digest, head = hashlib.sha256(), b""
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        if len(head) < 1024:
                            head += chunk[:1024]
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if looks_like_html(head):
            raise html_error(f"MODEL_URL {url}")
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise sha_error(f"MODEL_URL {url}", digest.hexdigest(), expected_sha256)
        os.replace(tmp, dest)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ModelLoadError(f"downloading MODEL_URL {url} failed: {exc or type(exc).__name__}") from None
    finally:
        tmp.unlink(missing_ok=True)


async def fetch_model_file(model_path: Path, model_url: str | None, expected_sha256: str | None) -> ModelFile:
    """Download the export if it is missing and a URL is set, then check it."""
    if not model_path.exists() and model_url:
        await download_model(model_url, model_path, expected_sha256)
    return open_model_file(model_path, expected_sha256)
