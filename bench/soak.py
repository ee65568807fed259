"""Soak test: `python -m bench.soak [--minutes 3] [--concurrency 48]`.

Starts the service on a free loopback port with the default model and sends it a bounded mix of
good photos, bad uploads and bursts beyond its queue for a few minutes. Reports requests served,
responses by status and the server's RSS over time, to show that memory does not grow and that
overload is shed with 503 + Retry-After and recovered from.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.servers import ROOT, memory_mb, photo, start_ours


async def soak(url: str, pid: int, minutes: float, concurrency: int) -> None:
    bodies = {
        "640x480": photo((640, 480)),
        "12MP": photo((4000, 3000)),
        "text": b"not an image at all",
        "truncated": photo((640, 480))[:5000],
    }
    weights = {"640x480": 70, "12MP": 10, "text": 10, "truncated": 10}
    statuses: Counter = Counter()
    retry_after_seen = 0
    rss: list[tuple[float, float]] = []
    deadline = time.monotonic() + minutes * 60
    rng = random.Random(0)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal retry_after_seen
        while time.monotonic() < deadline:
            kind = rng.choices(list(weights), weights=list(weights.values()))[0]
            form = aiohttp.FormData()
            form.add_field("file", bodies[kind], filename=f"{kind}.jpg", content_type="image/jpeg")
            try:
                async with session.post(url + "/upload", data=form) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status == 503 and "Retry-After" in resp.headers:
                        retry_after_seen += 1
                        await asyncio.sleep(float(resp.headers["Retry-After"]) * rng.random())
            except (TimeoutError, aiohttp.ClientError) as exc:
                statuses[type(exc).__name__] += 1

    async def sample() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, memory_mb(pid)))
            await asyncio.sleep(5)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(sample(), *(client(session) for _ in range(concurrency)))
        async with session.get(url + "/readyz") as resp:
            recovered = resp.status == 200

    warm = [m for t, m in rss if t >= 30] or [m for _, m in rss]
    print(f"soak: {minutes:g} min, {concurrency} concurrent clients, loopback only")
    print(f"requests: {sum(statuses.values())}; by status: {dict(sorted(statuses.items(), key=str))}")
    print(f"503 with Retry-After: {retry_after_seen}; ready after the run: {recovered}")
    print(f"RSS MB: start {rss[0][1]:.0f}, after warm-up {warm[0]:.0f}, peak {max(m for _, m in rss):.0f}, "
          f"end {rss[-1][1]:.0f} (growth after warm-up {warm[-1] - warm[0]:+.0f} MB)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=48, help="more than QUEUE_SIZE to exercise shedding")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "export.pkl")
    args = parser.parse_args()
    server = start_ours(args.model, QUEUE_SIZE="16")
    try:
        asyncio.run(soak(server.url, server.proc.pid, args.minutes, args.concurrency))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
