"""A model swap (SIGHUP) under load: failed requests and the time to switch.

    python -m bench.swap NEW_EXPORT [--clients 32] [--model models/export.pkl]

Serves a copy of `--model` on a loopback port, keeps `--clients` clients uploading a 640x480
photo, replaces the copy's files with NEW_EXPORT's (export, detector, card), sends SIGHUP, and
prints the seconds until `/model` names the new export, the requests answered before and after,
and every status that was not 200.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.servers import ROOT, photo

FILES = ("export.pkl", "export.detector.npz", "model-card.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__.split("\n\n")[0])
    parser.add_argument("new", type=Path, help="the export to swap in")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "export.pkl")
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from support import AppProcess

    from app.core.files import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in FILES:
            shutil.copy(args.model.with_name(name), folder / name)
        app = AppProcess({"MODEL_PATH": str(folder / "export.pkl")}, folder / "server.log").wait_ready()
        image, statuses, stop = photo((640, 480)), Counter(), threading.Event()
        new_sha = sha256_file(args.new)

        def client() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        status = session.post(app.url + "/upload", files={"file": ("p.jpg", image)}, timeout=60)
                        statuses[status.status_code] += 1
                    except requests.RequestException as exc:
                        statuses[type(exc).__name__] += 1

        try:
            with ThreadPoolExecutor(args.clients) as pool:
                for _ in range(args.clients):
                    pool.submit(client)
                time.sleep(5)
                for name in FILES:
                    shutil.copy(args.new.with_name(name), folder / f".{name}.new")
                    (folder / f".{name}.new").replace(folder / name)
                before = sum(statuses.values())
                t0 = time.monotonic()
                app.proc.send_signal(signal.SIGHUP)
                while requests.get(app.url + "/model", timeout=10).json()["sha256"] != new_sha:
                    time.sleep(0.05)
                switched = time.monotonic() - t0
                during = sum(statuses.values()) - before
                time.sleep(5)
                stop.set()
        finally:
            stop.set()
            app.stop()
    others = {k: v for k, v in statuses.items() if k != 200}
    print(f"{args.clients} clients: switched {switched:.1f} s after SIGHUP; {sum(statuses.values())} requests, "
          f"{during} of them answered while the new model was loaded and checked; not 200: {others or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
