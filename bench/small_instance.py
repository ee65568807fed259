"""The service on a free instance's share of a CPU: cold start and one client's latency under a CPU quota.

    sudo .venv/bin/python -m bench.small_instance [--cpus 1,0.5,0.1] [--requests 40]

Compiles the default model's bundle (what the default image serves), then for each CPU quota starts
`python -m app` on it inside a cgroup with that quota (cgroup v1 `cpu.cfs_quota_us` or v2 `cpu.max`:
what `docker run --cpus` and the platforms' "0.1 CPU" set), THREADS left to its default (which
follows the quota), and one client uploading a 640x480 photo again and again. Prints, side by side:
seconds from the start to /readyz and to the first answer, and the one-client p50 and p90 latency.
Needs root (to make the cgroups); traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TEDDIES = ROOT.parent / "shared" / "data" / "bears" / "teddys"
PERIOD_US = 100_000


def make_cgroup(name: str, cpus: float) -> Path:
    """A cgroup limited to `cpus` CPUs; its `tasks` (v1) or `cgroup.procs` (v2) file is returned."""
    quota = int(cpus * PERIOD_US)
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        folder = v1 / name
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (folder / "cpu.cfs_quota_us").write_text(str(quota))
        return folder / "tasks"
    folder = Path("/sys/fs/cgroup") / name
    folder.mkdir(exist_ok=True)
    (folder / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    return folder / "cgroup.procs"


def photo() -> bytes:
    files = sorted(TEDDIES.glob("*.jpg"))[:1]
    image = Image.open(files[0]).convert("RGB") if files else Image.new("RGB", (640, 480), (150, 110, 70))
    buffer = io.BytesIO()
    image.resize((640, 480)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure(bundle: Path, cpus: float, requests_count: int, data: bytes, port: int) -> dict:
    procs = make_cgroup(f"cuddle-bench-{int(cpus * 100)}", cpus)
    env = {**os.environ, "MODEL_PATH": str(bundle), "PORT": str(port), "HOST": "127.0.0.1"}
    env.pop("THREADS", None)
    log = tempfile.TemporaryFile()
    start = time.monotonic()
    server = subprocess.Popen(["sh", "-c", f'echo $$ > {procs} && exec "$0" -m app', sys.executable], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = first = None
        while first is None and time.monotonic() - start < 300:
            try:
                if ready is None and requests.get(url + "/readyz", timeout=5).status_code == 200:
                    ready = time.monotonic() - start
                if ready is not None and requests.post(url + "/upload", files={"file": ("p.jpg", data)},
                                                       timeout=60).status_code == 200:
                    first = time.monotonic() - start
            except requests.ConnectionError:
                time.sleep(0.05)
        log.seek(0)
        threads = re.search(rb"threads=(\d+)", log.read()).group(1).decode()
        latencies = []
        for _ in range(requests_count):
            t = time.perf_counter()
            assert requests.post(url + "/upload", files={"file": ("p.jpg", data)}, timeout=60).status_code == 200
            latencies.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(30)
        procs.parent.rmdir()
    latencies.sort()
    return {"cpus": cpus, "ready": ready, "first": first, "threads": threads,
            "p50": statistics.median(latencies), "p90": latencies[int(0.9 * (len(latencies) - 1))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.small_instance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default="1,0.5,0.1", help="CPU quotas to compare, comma-separated")
    parser.add_argument("--requests", type=int, default=40, help="uploads timed at each quota")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from support import free_port

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        subprocess.run([sys.executable, "-m", "app.compile", str(ROOT / "models" / "export.pkl"), "--out",
                        str(bundle)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        data = photo()
        rows = [measure(bundle, float(c), args.requests, data, free_port()) for c in args.cpus.split(",")]
    base = rows[0]
    print(f"{'CPUs':>5} {'threads':>7} {'ready':>7} {'1st answer':>10} {'p50':>8} {'p90':>8} {'p50 ratio':>9}")
    for row in rows:
        print(f"{row['cpus']:>5g} {row['threads']!s:>7} {row['ready']:>6.2f}s {row['first']:>9.2f}s "
              f"{1000 * row['p50']:>6.0f}ms {1000 * row['p90']:>6.0f}ms {row['p50'] / base['p50']:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
