"""Load generator, run as its own process: `python -m bench.load URL IMAGE CONCURRENCY SECONDS MAX`.

Keeps CONCURRENCY uploads in flight for up to SECONDS (or MAX requests), then prints JSON with
every latency, the error counts by status, and the CPU seconds the load generator itself used.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

BOUNDARY = "cuddle-or-not-bench"


def multipart_body(image: bytes) -> bytes:
    """The upload a browser sends, built once: the load generator shares the server's cores, so
    the less it spends per request the less it distorts what is measured."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n")
    return head.encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


async def run(url: str, image: bytes, concurrency: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: Counter = Counter()
    started = 0
    deadline = time.perf_counter() + seconds
    body = multipart_body(image)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal started
        while time.perf_counter() < deadline and started < max_requests:
            started += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[str(status)] += 1

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"latencies": latencies, "errors": dict(errors), "elapsed": elapsed,
            "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before}


if __name__ == "__main__":
    url, image, concurrency, seconds, max_requests = sys.argv[1:6]
    result = asyncio.run(run(url, Path(image).read_bytes(), int(concurrency), float(seconds), int(max_requests)))
    print(json.dumps(result))
