"""Memory of the ways to serve the default model, side by side in one run.

    python -m bench.memory [--seconds 60] [--clients 32]

Serves the default model three ways on loopback ports, one after the other: the export (learner
loaded and checked at start-up, as `docker build .` runs it), the export again (a restart: the
checked compiled model first, the learner in the background), and its checked bundle with torch
and fastai made unimportable (as the slim image runs it). For each: seconds to ready, RSS at rest
(once the learner, if any, is done), and RSS after `--clients` clients upload phone-sized photos
for `--seconds`, with the requests per second they got.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.servers import ROOT, Server, memory_mb, photo, start_ours

HEAVY = ("torch", "torchvision", "fastai", "fastcore")


def serve(model: Path, without_heavy: bool, **env: str) -> Server:
    """Ours on `model`, once ready and done with its learner; torch and fastai unimportable in it and
    its children with `without_heavy`. MALLOC_ARENA_MAX as both Docker images set it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support import unimportable_env

    return start_ours(model, MALLOC_ARENA_MAX="2", **env, **(unimportable_env(HEAVY) if without_heavy else {}))


def load(url: str, image: Path, clients: int, seconds: float) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.load", url + "/upload", str(image), str(clients),
                          str(seconds), "10000000"], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return len(result["latencies"]) / result["elapsed"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache, bundle, image = Path(tmp) / "cache", Path(tmp) / "bundle", Path(tmp) / "photo.jpg"
        image.write_bytes(photo((640, 480)))
        # A copy of the default model in a folder of its own: no compiled record of an earlier start.
        export = Path(shutil.copytree(ROOT / "models", Path(tmp) / "model",
                                      ignore=shutil.ignore_patterns("*.onnx", "*.onnx.json"))) / "export.pkl"
        subprocess.run([sys.executable, "-m", "app.compile", str(export), "--out", str(bundle)], cwd=ROOT,
                       check=True, capture_output=True)
        ways = [("export, first start", export, {"CACHE_DIR": str(cache)}, False),
                ("export, restart", export, {"CACHE_DIR": str(cache)}, False),
                ("bundle, no torch", bundle, {}, True)]
        print(f"| served as | ready | RSS at rest | RSS after {args.clients} clients for {args.seconds:g} s | "
              "peak RSS | req/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, model, env, without_heavy in ways:
            server = serve(model, without_heavy, **env)
            try:
                rest = memory_mb(server.proc.pid)
                rate = load(server.url, image, args.clients, args.seconds)
                after, peak = memory_mb(server.proc.pid), memory_mb(server.proc.pid, "VmHWM")
            finally:
                server.stop()
            print(f"| {name} | {server.cold_start_s:.1f} s | {rest:.0f} MB | {after:.0f} MB | {peak:.0f} MB | "
                  f"{rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
