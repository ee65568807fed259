"""Helpers shared by the tests: synthetic images, local HTTP servers, a real `python -m app`."""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BEARS = ROOT.parent / "shared" / "data" / "bears"
NO_BEARS = "the bear photos in ../shared/data/bears are not here (a fresh clone); CI has them"

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install "
                                                                 "chromium (.ci/run installs it)")
# Flags for a closed network: no background connections that would fail and spam the console.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def axe_serious_violations(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']}: {v['help']}" for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


# Colour per synthetic class: a tiny CNN tells these apart after one epoch.
CLASS_COLOURS = {"blues": (40, 60, 200), "greens": (40, 180, 60), "reds": (200, 40, 40)}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def synthetic_image(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 25, size=(size[1], size[0], 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def image_bytes(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_dataset(root: Path, per_class: int = 10) -> Path:
    for cls, colour in CLASS_COLOURS.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_image(colour, seed=i).save(root / cls / f"{i}.jpg")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


# --- A local HTTP server with canned answers -----------------------------------------------------


Route = tuple[int, dict[str, str], bytes] | Callable[[BaseHTTPRequestHandler], None]


@dataclass
class LocalHTTPServer:
    """http.server on a loopback address, serving `routes` and recording every request path."""

    host: str = "127.0.0.1"
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append(self.path)
                route = outer.routes.get(self.path)
                if route is None:
                    route = (404, {"Content-Type": "text/plain"}, b"not found")
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- A real server process -----------------------------------------------------------------------


# What the slim image does not install: made unimportable where a test serves as it does.
HEAVY = ("torch", "torchvision", "fastai", "fastcore")


def unimportable_env(names: tuple[str, ...]) -> dict[str, str]:
    """Environment variables that make these packages unimportable in a Python process and its
    children (tests/unimportable/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "unimportable"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "UNIMPORTABLE": ",".join(names)}


class AppProcess:
    """`python -m app` (the Docker start command) on a free port, with its log captured."""

    def __init__(self, env: dict[str, str], log_path: Path, container: Path | None = None,
                 without: tuple[str, ...] = (), python: str = sys.executable):
        """`container`: start as a container with a mounted model folder does: `container` mounted
        read-only (in a mount namespace of its own) and no home folder to write to. `without`:
        packages made unimportable, as if not installed, in the server and its child processes
        (tests/unimportable/sitecustomize.py). `python`: the interpreter (another virtual
        environment's)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "THREADS": "2", **env}
        command = [python, "-m", "app"]
        if without:
            full_env.update(unimportable_env(without))
        if container is not None:
            full_env["HOME"] = "/proc/no-home"  # not even root can create anything there
            for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
                full_env.pop(name, None)
            command = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                       str(container), *command]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120, learner: bool = True) -> AppProcess:
        """Wait for /readyz, and by default also for the learner: a restart serves the checked
        compiled model first and loads the learner in the background (app/startup.py), which
        would otherwise run during a test's measurements."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                response = requests.get(self.url + ("/model" if learner else "/readyz"), timeout=1)
                if response.status_code == 200 and (not learner or response.json()["learner"] != "loading"):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def can_mount_read_only() -> bool:
    """Whether this process may make a private read-only mount (root in most CI containers)."""
    result = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --bind -o ro / /"], capture_output=True)
    return result.returncode == 0


def run_app_until_exit(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(free_port()), **env}
    return subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def drawn_teddy(size: int = 640) -> bytes:
    """A teddy bear drawn with circles: a licence-free photo for screenshots and front-end tests."""
    from PIL import ImageDraw, ImageFilter

    s = size / 640
    img = Image.new("RGB", (size, size), (235, 225, 205))
    draw = ImageDraw.Draw(img)
    fur, light, dark = (160, 105, 55), (215, 170, 120), (40, 25, 15)

    def oval(box, colour):
        draw.ellipse(tuple(v * s for v in box), fill=colour)

    for box, colour in [((170, 300, 470, 620), fur), ((230, 380, 410, 560), light), ((110, 330, 210, 450), fur),
                        ((430, 330, 530, 450), fur), ((170, 540, 290, 640), fur), ((350, 540, 470, 640), fur),
                        ((190, 60, 450, 320), fur), ((170, 40, 260, 130), fur), ((380, 40, 470, 130), fur),
                        ((192, 62, 238, 108), light), ((402, 62, 448, 108), light), ((260, 190, 380, 290), light),
                        ((295, 200, 345, 240), dark), ((250, 140, 280, 170), dark), ((360, 140, 390, 170), dark)]:
        oval(box, colour)
    draw.arc(tuple(v * s for v in (285, 225, 355, 275)), 20, 160, fill=dark, width=max(1, int(5 * s)))
    return image_bytes(img.filter(ImageFilter.GaussianBlur(1.5 * s)), "JPEG", quality=92)


# --- The review page of app.clean, in this process ------------------------------------------------


class ReviewServer:
    """`create_review_app` under a real uvicorn on a loopback port, in a thread."""

    def __init__(self, data: Path, incoming: Path | None = None):
        import uvicorn

        from app.building.ranking import score_folder
        from app.building.review_app import create_review_app

        self.ranking = score_folder(data, threads=1)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.token = secrets.token_urlsafe(16)
        # What the page's script does: the token from its link on every request for data.
        self.http = requests.Session()
        self.http.headers["X-Review-Token"] = self.token
        config = uvicorn.Config(create_review_app(data, self.ranking, self.token, "127.0.0.1", port, incoming),
                                host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "review server did not start"
            time.sleep(0.05)

    def items(self) -> dict:
        return self.http.get(self.url + "/api/items", timeout=10).json()

    def decide(self, item_id, action: str, to: str | None = None) -> requests.Response:
        return self.http.post(self.url + "/api/decide", json={"id": item_id, "action": action, "to": to}, timeout=10)

    def undo(self) -> requests.Response:
        return self.http.post(self.url + "/api/undo", timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
