"""Slow and silent connections against the header deadline (HEADER_TIMEOUT_S), for each HTTP parser.

    python -m bench.slow_headers [--clients 500] [--header-timeout 10] [--http httptools,h11]

Starts the service on the default model (loopback only) for each parser, times `/healthz` alone,
then opens `--clients` connections, half of them sending their request headers a byte a second and
half sending nothing, and times `/healthz` again while they are held. Prints how many were closed by
the server (and answered 408), how long after they opened, and the health-check latency held / alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.slow_clients import timed_get

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Held:
    answered_408: bool
    closed: bool  # by the server, before we gave up
    seconds: float  # from opening to the close (or to giving up)


async def hold(port: int, trickle: bool, give_up: float) -> Held:
    """A connection that sends a request line and then a header byte a second (`trickle`), or nothing."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        if trickle:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
        pending = b"Host: 127.0.0.1\r\n" + b"X-Slow: " + b"x" * 1000
        read = asyncio.ensure_future(reader.read())
        while time.monotonic() - start < give_up:
            done, _ = await asyncio.wait({read}, timeout=1.0)
            if done:
                received = read.result()
                break
            if trickle and pending:
                writer.write(pending[:1])
                pending = pending[1:]
        else:
            read.cancel()
            return Held(False, False, time.monotonic() - start)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return Held(received.startswith(b"HTTP/1.1 408 "), True, time.monotonic() - start)


async def health_latencies(base: str, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latencies.append(await timed_get(base + "/healthz"))
        await asyncio.sleep(0.05)
    return latencies


async def measure(port: int, clients: int, header_timeout: float) -> dict:
    base = f"http://127.0.0.1:{port}"
    alone = await health_latencies(base, 3.0)
    held = [asyncio.ensure_future(hold(port, trickle=i % 2 == 0, give_up=header_timeout * 3 + 10))
            for i in range(clients)]
    await asyncio.sleep(0.5)  # all of them connected
    during = await health_latencies(base, header_timeout * 0.8)
    return {"alone": alone, "during": during, "held": await asyncio.gather(*held)}


def report(name: str, out: dict, header_timeout: float) -> None:
    held: list[Held] = out["held"]
    trickled, silent = held[0::2], held[1::2]
    for kind, group in (("trickling headers", trickled), ("silent", silent)):
        closed = [h for h in group if h.closed]
        times = sorted(h.seconds for h in closed) or [float("nan")]
        print(f"{name}: {len(group)} {kind}: {len(closed)} closed by the server ({sum(h.answered_408 for h in group)} "
              f"with 408), after min {times[0]:.1f} s, median {statistics.median(times):.1f} s, max {times[-1]:.1f} s "
              f"(HEADER_TIMEOUT_S={header_timeout:g})")
    alone, during = statistics.median(out["alone"]), statistics.median(out["during"])
    print(f"{name}: /healthz p50 alone {1000 * alone:.1f} ms, while {len(held)} were held {1000 * during:.1f} ms "
          f"({during / alone:.2f}x), max {1000 * max(out['during']):.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_headers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--header-timeout", type=float, default=10, help="HEADER_TIMEOUT_S for the server")
    parser.add_argument("--http", default="httptools,h11", help="the parsers to measure, comma-separated")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from support import AppProcess

    for name in args.http.split(","):
        log = Path("/tmp") / f"bench-slow-headers-{name}.log"
        app = AppProcess({"HEADER_TIMEOUT_S": str(args.header_timeout), "HTTP_IMPLEMENTATION": name}, log).wait_ready()
        try:
            out = asyncio.run(measure(app.port, args.clients, args.header_timeout))
        finally:
            app.stop()
        report(name, out, args.header_timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
