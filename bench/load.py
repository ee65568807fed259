"""Load generator, run as its own process: `python -m bench.load URL IMAGE CONCURRENCY SECONDS MAX`.

Keeps CONCURRENCY uploads in flight for up to SECONDS (or MAX requests), then prints JSON with
every latency and the error counts by status.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp


async def run(url: str, image: bytes, concurrency: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: Counter = Counter()
    started = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal started
        while time.perf_counter() < deadline and started < max_requests:
            started += 1
            form = aiohttp.FormData()
            form.add_field("file", image, filename="photo.jpg", content_type="image/jpeg")
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=form) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[str(status)] += 1

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return {"latencies": latencies, "errors": dict(errors), "elapsed": time.perf_counter() - t0}


if __name__ == "__main__":
    url, image, concurrency, seconds, max_requests = sys.argv[1:6]
    result = asyncio.run(run(url, Path(image).read_bytes(), int(concurrency), float(seconds), int(max_requests)))
    print(json.dumps(result))
