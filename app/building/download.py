"""Step 1 of the lesson's loop: download image-search results (one URL a line) into class folders.

Every body is read whole, up to a size cap, and kept only if it decodes as the server decodes
photos; each failure is counted by its reason, so a summary says what went wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app.building.cli import UsageError
from app.core.formats import suffix_for
from app.core.images import ImageError, decode_image, image_format


@dataclass
class DownloadReport:
    saved: Counter[str] = field(default_factory=Counter)  # per class
    failed: Counter[str] = field(default_factory=Counter)  # per reason

    def summary(self) -> str:
        saved = sum(self.saved.values())
        if not self.failed:
            return f"{saved} saved"
        by_count = sorted(self.failed.items(), key=lambda item: (-item[1], item[0]))
        reasons = ", ".join(f"{n} {reason}" for reason, n in by_count)
        return f"{saved} saved, {sum(self.failed.values())} failed ({reasons})"


def parse_url_specs(specs: list[str]) -> dict[str, list[str]]:
    """Parse `CLASS=FILE` options into {class: [url, ...]}."""
    urls: dict[str, list[str]] = {}
    for spec in specs:
        cls, sep, filename = spec.partition("=")
        if not sep or not cls or not filename:
            raise UsageError(f"--urls takes CLASS=FILE, got {spec!r}")
        try:
            lines = Path(filename).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read URL file {filename}: {exc}") from None
        urls.setdefault(cls, []).extend(u.strip() for u in lines if u.strip() and not u.startswith("#"))
    return urls


class Failed(Exception):
    """One URL that gave no photo; the message is the reason the summary counts."""


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, however it is chunked on the wire; `Failed` once it passes `max_bytes`.
    (`resp.content.read(n)` returns what has arrived so far, not n bytes: photos were truncated.)"""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise Failed("too large")
    parts, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise Failed("too large")
        parts.append(chunk)
    return b"".join(parts)


async def download_one(session: aiohttp.ClientSession, url: str, dest_dir: Path, max_bytes: int) -> Path:
    """Download one photo into `dest_dir`, named by its content; `Failed` with the reason if not."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}")
            body = await read_capped(resp, max_bytes)
    except TimeoutError:
        raise Failed("timeout") from None
    except (aiohttp.ClientError, ValueError):
        raise Failed("connection failed") from None
    try:
        decode_image(body)  # as the server would: broken files and refused formats fail here
    except ImageError:
        raise Failed("not an image") from None
    suffix = suffix_for(image_format(body))
    if suffix is None:
        raise Failed("not an image")
    # Named by content, so that re-running a download never duplicates an image.
    path = dest_dir / (hashlib.sha256(body).hexdigest()[:16] + suffix)
    path.write_bytes(body)
    return path


async def download_images(urls: dict[str, list[str]], data: Path, max_per_class: int, concurrency: int = 8,
                          timeout_s: float = 15, max_bytes: int = 20 << 20) -> DownloadReport:
    """Download up to `max_per_class` images per class into DATA/CLASS/, counting failures by reason."""
    report = DownloadReport()
    jobs = [(cls, url) for cls, class_urls in urls.items() for url in class_urls[:max_per_class]]
    for cls in urls:
        (data / cls).mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(concurrency)

    async def fetch(session: aiohttp.ClientSession, cls: str, url: str) -> None:
        async with semaphore:
            try:
                await download_one(session, url, data / cls, max_bytes)
            except Failed as failure:
                report.failed[str(failure)] += 1
            else:
                report.saved[cls] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(fetch(session, cls, url) for cls, url in jobs))
    return report
