"""`kill -HUP`: the server loads MODEL_PATH again beside the model in service, checks it as at
start-up and switches between batches, under load and without a failed request; a model that fails
its check is refused while the old one keeps serving."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from support import AppProcess, image_bytes, synthetic_image

from app.core.files import sha256_file

MODEL_FILES = ("export.pkl", "export.detector.npz", "model-card.json")


def put_model(source: Path, folder: Path) -> None:
    """Replace the served model's files, each renamed into place as a deployment would."""
    for name in MODEL_FILES:
        shutil.copy(source.with_name(name), folder / f".{name}.new")
        (folder / f".{name}.new").replace(folder / name)


def served_sha(app: AppProcess) -> str:
    return requests.get(app.url + "/model", timeout=10).json()["sha256"]


def wait_for(condition, timeout: float = 120) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


def metric(app: AppProcess, result: str) -> float:
    for line in requests.get(app.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'model_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_sighup_swaps_the_model_under_load_and_refuses_a_broken_one(tiny_export, other_export, tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    put_model(tiny_export, folder)
    app = AppProcess({"MODEL_PATH": str(folder / "export.pkl")}, tmp_path / "server.log").wait_ready()
    photo = image_bytes(synthetic_image((40, 180, 60), size=(64, 48)))
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set() and len(statuses) < 50_000:
                response = session.post(app.url + "/upload", files={"file": ("p.jpg", photo)}, timeout=30)
                statuses.append(response.status_code)

    try:
        assert served_sha(app) == sha256_file(tiny_export)
        with ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client) for _ in range(8)]
            time.sleep(1)
            put_model(other_export, folder)
            app.proc.send_signal(signal.SIGHUP)
            switch = wait_for(lambda: served_sha(app) == sha256_file(other_export))
            before = len(statuses)
            time.sleep(1)
            stop.set()
            for c in clients:
                c.result()
        assert len(statuses) > before > 0 and set(statuses) == {200}, (switch, set(statuses))
        assert requests.get(app.url + "/model", timeout=10).json()["learner"] == "loaded"
        assert metric(app, "switched") == 1

        (folder / "export.pkl").write_bytes(b"<!DOCTYPE html><html>a share page</html>")
        app.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in app.log())
        assert served_sha(app) == sha256_file(other_export)  # the old model keeps serving
        assert requests.post(app.url + "/upload", files={"file": ("p.jpg", photo)}, timeout=30).status_code == 200
        assert metric(app, "refused") == 1
        refused = [line for line in app.log().splitlines() if "reload refused" in line]
        assert len(refused) == 1 and "HTML page" in refused[0]
    finally:
        stop.set()
        assert app.stop() == 0
