"""What the benchmarks share: a real photo or a stand-in, the servers started as real processes on
free loopback ports (ours and the course-starter baseline), and one load level driven from a
separate load-generator process (`bench.load`), with the CPU time both spent."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BEARS = ROOT.parent / "shared" / "data" / "bears"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo(size: tuple[int, int]) -> bytes:
    """A real bear photo (if the shared data is here) resized to `size`, else a textured image."""
    source = sorted((BEARS / "grizzly").glob("*.jpg"))[:1] if BEARS.is_dir() else []
    if source:
        img = Image.open(source[0]).convert("RGB").resize(size, Image.LANCZOS)
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        arr = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --- Servers -------------------------------------------------------------------------------------


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc (VmRSS: now, VmHWM: peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    cold_start_s: float
    learner_s: float  # until the learner is loaded: later than ready when a checked compiled model is served first

    def peak_rss_mb(self) -> float:
        return memory_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start(name: str, command: list[str], env: dict[str, str], port: int) -> Server:
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.perf_counter() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"{name} did not become ready")
        time.sleep(0.05)
    ready = time.perf_counter() - t0
    # Measure nothing while ours is still loading the learner in the background.
    while name.startswith("ours") and requests.get(url + "/model", timeout=5).json()["learner"] == "loading":
        time.sleep(0.1)
    return Server(name, proc, url, ready, time.perf_counter() - t0)


def start_ours(model: Path, **env: str) -> Server:
    port = free_port()
    return start("ours", [sys.executable, "-m", "app"],
                 {"MODEL_PATH": str(model), "PORT": str(port), "LOG_LEVEL": "warning", **env}, port)


def start_baseline(model: Path) -> Server:
    port = free_port()
    return start("baseline", [sys.executable, "-m", "bench.baseline", str(model), str(port)], {}, port)


@dataclass
class LoadResult:
    p50_ms: float
    p99_ms: float
    rps: float
    ok: int
    errors: dict
    server_cpu_ms: float  # CPU time per answered request, all threads: of the server...
    client_cpu_ms: float  # ...and of the load generator, which runs on the same cores

    @classmethod
    def run(cls, server: Server, image: Path, concurrency: int, seconds: float, max_requests: int) -> LoadResult:
        # Warm-up, so that lazy initialisation is not charged to the first measured request.
        for _ in range(2):
            requests.post(server.url + "/upload", files={"file": ("w.jpg", image.read_bytes())}, timeout=120)
        cpu_before = cpu_seconds(server.proc.pid)
        out = subprocess.run([sys.executable, "-m", "bench.load", server.url + "/upload", str(image),
                              str(concurrency), str(seconds), str(max_requests)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        server_cpu = cpu_seconds(server.proc.pid) - cpu_before
        data = json.loads(out.stdout)
        lat = np.array(data["latencies"]) * 1000
        n = max(len(lat), 1)
        return cls(float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                   float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                   len(lat) / data["elapsed"], len(lat), data["errors"], server_cpu * 1000 / n,
                   data["cpu_s"] * 1000 / n)


