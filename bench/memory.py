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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.__main__ import ROOT, memory_mb, photo

HEAVY = ("torch", "torchvision", "fastai", "fastcore")


def serve(env: dict[str, str], without_heavy: bool) -> tuple[subprocess.Popen, str, float]:
    """A started server, its URL and the seconds it took to answer /readyz."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support import free_port, unimportable_env

    port = free_port()
    if without_heavy:
        env = {**env, **unimportable_env(HEAVY)}
    t0 = time.perf_counter()
    # MALLOC_ARENA_MAX as both Docker images set it.
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "MALLOC_ARENA_MAX": "2", **env}
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    ready = time.perf_counter() - t0
    while requests.get(url + "/model", timeout=5).json()["learner"] == "loading":
        time.sleep(0.2)
    return proc, url, ready


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
        ways = [("export, first start", {"MODEL_PATH": str(export), "CACHE_DIR": str(cache)}, False),
                ("export, restart", {"MODEL_PATH": str(export), "CACHE_DIR": str(cache)}, False),
                ("bundle, no torch", {"MODEL_PATH": str(bundle)}, True)]
        print(f"| served as | ready | RSS at rest | RSS after {args.clients} clients for {args.seconds:g} s | "
              "peak RSS | req/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, env, without_heavy in ways:
            proc, url, ready = serve(env, without_heavy)
            try:
                rest = memory_mb(proc.pid)
                rate = load(url, image, args.clients, args.seconds)
                after, peak = memory_mb(proc.pid), memory_mb(proc.pid, "VmHWM")
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"| {name} | {ready:.1f} s | {rest:.0f} MB | {after:.0f} MB | {peak:.0f} MB | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
