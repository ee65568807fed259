"""Slow clients: many uploads that trickle a byte a second, against the body deadline (BODY_TIMEOUT_S).

    python -m bench.slow_clients [--clients 1000] [--body-timeout 10]

Starts the service on the default model (loopback only) with the given BODY_TIMEOUT_S, opens
`--clients` uploads that send their headers and then one byte a second, and meanwhile times
`/healthz` and real uploads. Prints how many tricklers got 408 and had their connection closed,
how long after they started, and the latency of the others while they were held.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "trickle"


@dataclass
class Trickled:
    status: int | None  # the status the server answered, None if it never did
    closed: bool  # whether the server closed the connection after answering
    seconds: float  # from the first byte sent to the answer (or to giving up)


async def trickle_upload(port: int, declared: int = 100_000, every: float = 1.0, give_up: float = 120) -> Trickled:
    """An upload that declares `declared` bytes and sends one every `every` seconds."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {declared}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n")
    writer.write(head.encode())
    status, closed = None, False
    try:
        read_status = asyncio.ensure_future(reader.readline())
        while time.monotonic() - start < give_up:
            done, _ = await asyncio.wait({read_status}, timeout=every)
            if done:
                line = read_status.result()
                status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
                break
            writer.write(b"x")
            await writer.drain()
        seconds = time.monotonic() - start
        if status is not None:
            try:  # the rest of the answer, then the end of the stream if the server closed it
                await asyncio.wait_for(reader.read(), timeout=20)
                closed = reader.at_eof()
            except ConnectionResetError:
                closed = True  # closed with trickled bytes still unread: the kernel resets instead
            except TimeoutError:
                closed = False
    except (ConnectionError, OSError):
        seconds = time.monotonic() - start
    finally:
        writer.close()
    return Trickled(status, closed, seconds)


async def timed_get(url: str) -> float:
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - start


async def timed_upload(url: str, photo: bytes) -> float:
    import aiohttp

    start = time.perf_counter()
    form = aiohttp.FormData()
    form.add_field("file", photo, filename="p.jpg", content_type="image/jpeg")
    async with aiohttp.ClientSession() as session, session.post(url, data=form) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - start


async def measure(port: int, clients: int, photo: bytes, probe_seconds: float) -> dict:
    """Tricklers and, while they are held, timed health checks and real uploads."""
    base = f"http://127.0.0.1:{port}"
    tricklers = [asyncio.ensure_future(trickle_upload(port)) for _ in range(clients)]
    health, uploads = [], []
    deadline = time.monotonic() + probe_seconds
    while time.monotonic() < deadline:
        health.append(await timed_get(base + "/healthz"))
        uploads.append(await timed_upload(base + "/upload", photo))
        await asyncio.sleep(0.2)
    results = await asyncio.gather(*tricklers)
    return {"results": results, "health": health, "uploads": uploads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--body-timeout", type=float, default=10, help="BODY_TIMEOUT_S for the server")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from support import AppProcess, drawn_teddy

    log = Path("/tmp") / "bench-slow-clients.log"
    app = AppProcess({"BODY_TIMEOUT_S": str(args.body_timeout)}, log).wait_ready()
    try:
        out = asyncio.run(measure(app.port, args.clients, drawn_teddy(), args.body_timeout * 0.8))
    finally:
        app.stop()
    results = out["results"]
    answered = [r for r in results if r.status == 408]
    print(f"{len(results)} trickling uploads, BODY_TIMEOUT_S={args.body_timeout:g}: {len(answered)} answered 408, "
          f"{sum(r.closed for r in answered)} of them closed by the server; other statuses: "
          f"{sorted({r.status for r in results} - {408})}")
    if answered:
        times = sorted(r.seconds for r in answered)
        print(f"time to 408: min {times[0]:.1f} s, median {statistics.median(times):.1f} s, max {times[-1]:.1f} s")
    for name in ("health", "uploads"):
        values = sorted(out[name])
        print(f"while held: {name} ({len(values)}): p50 {1000 * statistics.median(values):.0f} ms, "
              f"max {1000 * values[-1]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
