"""What an operator meets: every client reads its 413, a container starts quietly with no home
folder and a read-only model folder, and version labels of builds are not version drift."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import AppProcess, can_mount_read_only, run_app_until_exit

from app.learner.loading import same_release, warn_on_version_drift

UPLOAD_LIMIT_MB = 2  # the `server` fixture's MAX_UPLOAD_MB
OVERSIZED = 8 * 1024 * 1024  # four times the limit: well within what the server reads and discards


def multipart_head(boundary: str = "xyz") -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP response until the server closes; return its status and JSON body."""
    data = b""
    sock.settimeout(20)
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def raw_upload(server, chunked: bool) -> tuple[int, dict]:
    """A client that sends its whole body before reading anything, as most HTTP/1.1 clients do."""
    body = multipart_head() + b"\xff" * OVERSIZED
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n" + framing + b"\r\n")
        if chunked:
            for start in range(0, len(body), 256 * 1024):
                piece = body[start:start + 256 * 1024]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        else:
            sock.sendall(body)  # a reset connection fails here, before the answer is read
        return read_response(sock)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_sends_everything_first_reads_the_413(server, chunked):
    for _ in range(3):  # a reset is a race: one lucky try proves nothing
        status, body = raw_upload(server, chunked)
        assert status == 413
        assert body["error"]["code"] == "upload_too_large"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_urllib_reads_the_413(server, chunked):
    payload = multipart_head() + b"\xff" * OVERSIZED
    data = iter([payload[i:i + 65536] for i in range(0, len(payload), 65536)]) if chunked else payload
    request = urllib.request.Request(server.url + "/upload", data=data, method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413
    assert json.loads(err.value.read())["error"]["code"] == "upload_too_large"


def test_a_client_that_stops_sending_is_let_go_within_the_bounds(server):
    """The 413 is there to read at once; the connection closes once the client has been idle for
    the drain's idle bound (2 s), however much body it announced."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     + f"Content-Length: {OVERSIZED}\r\n\r\n".encode() + multipart_head())
        start = time.monotonic()
        status, body = read_response(sock)
        assert status == 413 and body["error"]["code"] == "upload_too_large"
        assert time.monotonic() - start < 6


def test_a_trickling_client_is_let_go_within_the_bounds(server):
    """A byte now and then resets the idle bound, but not the total one (10 s)."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     + f"Content-Length: {OVERSIZED}\r\n\r\n".encode() + multipart_head())
        start = time.monotonic()
        sock.settimeout(0.5)  # also the pace of the trickle
        while time.monotonic() - start < 20:
            try:
                sock.sendall(b"\xff")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break  # reset: the server has closed
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - start
    assert received.split(b"\r\n")[0].split()[1] == b"413"
    assert 9 < elapsed < 14


def test_a_client_waiting_for_100_continue_gets_the_413_without_sending(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     + f"Expect: 100-continue\r\nContent-Length: {OVERSIZED}\r\n\r\n".encode())
        start = time.monotonic()
        status, _ = read_response(sock)
    assert status == 413
    assert time.monotonic() - start < 1.5  # no drain: the client sent no body


# --- Versions ------------------------------------------------------------------------------------


def test_build_labels_are_not_version_drift(caplog):
    import fastai
    import torch

    base = torch.__version__.split("+")[0]
    assert same_release(f"{base}+cpu", f"{base}+cu130")
    assert not same_release("2.14.1", "2.14.0") and not same_release(None, "2.14.1")
    with caplog.at_level(logging.WARNING, logger="app.learner.loading"):
        warn_on_version_drift({"versions": {"fastai": fastai.__version__, "torch": f"{base}+cpu"}})
        warn_on_version_drift({"versions": {"fastai": fastai.__version__, "torch": f"{base}+cu130"}})
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="app.learner.loading"):
        warn_on_version_drift({"versions": {"fastai": fastai.__version__, "torch": "1.4.0+cpu"}})
    assert len(caplog.records) == 1 and "1.4.0+cpu" in caplog.records[0].getMessage()


# --- A container's start -------------------------------------------------------------------------

@pytest.fixture
def mounted_model(tiny_export: Path, tmp_path: Path) -> Path:
    """A copy of the tiny export with no compiled model yet, in a folder the server will see
    mounted read-only, as a host folder mounted into a container for a user that cannot write it."""
    if not can_mount_read_only():
        pytest.skip("cannot make a private read-only mount here (needs root or user namespaces)")
    shutil.copytree(tiny_export.parent, tmp_path / "model", ignore=shutil.ignore_patterns("*.onnx", "*.onnx.json"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "model" / "export.pkl"


def start_as_container(model: Path, log: Path, learner: bool = True, **env: str) -> AppProcess:
    # A TMPDIR of the test's own: the fallback cache must not be one an earlier run left behind.
    app = AppProcess({"MODEL_PATH": str(model), "TMPDIR": str(model.parent.parent / "tmp"), **env}, log,
                     container=model.parent)
    return app.wait_ready(learner=learner)


def test_a_read_only_model_folder_says_what_it_costs_and_restarts_fast(mounted_model, tmp_path):
    first = start_as_container(mounted_model, tmp_path / "first.log")
    first.stop()
    lines = [line for line in first.log().splitlines() if "is not writable" in line]
    assert len(lines) == 1, first.log()
    assert str(mounted_model.parent) in lines[0] and "CACHE_DIR" in lines[0]
    assert not list(mounted_model.parent.glob("*.onnx")), "nothing may be written into the mounted folder"
    # The same container restarting finds its compiled model in the fallback folder.
    again = start_as_container(mounted_model, tmp_path / "again.log", learner=False)
    again.stop()
    assert "serving the compiled model checked on an earlier start" in again.log()
    assert "is not writable" not in again.log()


def test_cache_dir_holds_the_compiled_model_of_a_read_only_model_folder(mounted_model, tmp_path):
    cache = tmp_path / "cache"
    app = start_as_container(mounted_model, tmp_path / "server.log", CACHE_DIR=str(cache))
    app.stop()
    assert "is not writable" not in app.log()
    assert list(cache.glob("*.onnx")) and list(cache.glob("*.onnx.json"))


def test_a_start_with_no_home_folder_logs_only_documented_lines(mounted_model, tmp_path):
    """The container's user has no home: no matplotlib or ONNX Runtime complaints, no font-cache
    rebuild news; only the service's own lines."""
    app = start_as_container(mounted_model, tmp_path / "server.log", CACHE_DIR=str(tmp_path / "cache"))
    app.stop()
    documented = ("compiled model to", "ready:", "Started server process", "Waiting for application startup",
                  "Application startup complete", "Uvicorn running on", "GET /model", "GET /readyz",
                  "Shutting down", "Waiting for application shutdown", "Application shutdown complete",
                  "Finished server process")
    unexpected = [line for line in app.log().splitlines() if not any(text in line for text in documented)]
    assert unexpected == []


def test_model_url_without_sha256_warns_that_an_export_runs_code(tmp_path):
    result = run_app_until_exit({"MODEL_PATH": str(tmp_path / "export.pkl"),
                                 "MODEL_URL": "http://127.0.0.1:9/export.pkl"})
    assert result.returncode == 3
    assert "MODEL_URL is set without MODEL_SHA256" in result.stderr
