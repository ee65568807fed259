"""Attacks: malformed uploads, hostile image servers, fuzzing, and what operators see.

Every hostile server here listens on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ROOT, AppProcess, image_bytes, png_claiming, synthetic_image

GOOD = image_bytes(synthetic_image((200, 40, 40)))
FETCH_TIMEOUT_S = 2  # the session server's setting


def rss_mb(server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_still_serving(server) -> None:
    resp = requests.post(server.url + "/upload", files={"file": ("ok.jpg", GOOD)}, timeout=30)
    assert resp.status_code == 200, resp.text


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims `width` x `height`."""
    data = bytearray(GOOD)
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"xyz") -> bytes:
    body = b""
    for disposition, content in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def post_raw(server, body: bytes, content_type: str) -> requests.Response:
    return requests.post(server.url + "/upload", data=body, headers={"Content-Type": content_type}, timeout=30)


FORM = "multipart/form-data; boundary=xyz"
CORRUPT_PNG = image_bytes(synthetic_image((1, 2, 3)), "PNG")
CORPUS = {
    "truncated jpeg": (GOOD[: len(GOOD) // 3], 415),
    "corrupted jpeg": (GOOD[:200] + bytes(255 - b for b in GOOD[200:]), 415),
    "truncated png": (CORRUPT_PNG[:60], 415),
    "corrupted png": (CORRUPT_PNG[:40] + b"\0" * 100 + CORRUPT_PNG[140:], 415),
    "zero bytes": (b"", 415),
    "text": (b"hello there, I am not a picture", 415),
    "html": (b"<!doctype html><html><body><img src=x></body></html>", 415),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', 415),
    "pdf": (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF", 415),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\0" * 40, 415),
    "png bomb": (png_claiming(100_000, 100_000), 413),
    "jpeg claiming 60000x60000": (jpeg_claiming(60000, 60000), 413),
}


@pytest.mark.parametrize("name", CORPUS)
def test_malformed_upload_corpus(server, name):
    data, status = CORPUS[name]
    resp = requests.post(server.url + "/upload", files={"file": (f"{name}.jpg", data)}, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]
    assert_still_serving(server)


@pytest.mark.parametrize("case", ["wrong field", "no boundary", "duplicate fields", "not multipart", "form field only",
                                  "broken multipart"])
def test_malformed_multipart_is_400(server, case):
    file_part = (b'form-data; name="file"; filename="a.jpg"', GOOD)
    if case == "wrong field":
        resp = post_raw(server, multipart([(b'form-data; name="image"; filename="a.jpg"', GOOD)]),
                        "multipart/form-data; boundary=xyz")
    elif case == "no boundary":
        resp = post_raw(server, multipart([file_part]), "multipart/form-data")
    elif case == "duplicate fields":
        resp = post_raw(server, multipart([file_part, file_part]), "multipart/form-data; boundary=xyz")
    elif case == "not multipart":
        resp = post_raw(server, GOOD, "image/jpeg")
    elif case == "form field only":
        resp = post_raw(server, multipart([(b'form-data; name="file"', b"just text")]), FORM)
    else:
        resp = post_raw(server, b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n', FORM)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]
    assert_still_serving(server)


def test_non_utf8_filename_is_fine(server):
    body = multipart([(b'form-data; name="file"; filename="b\xe4r-\xff\xfe.jpg"', GOOD)])
    resp = post_raw(server, body, "multipart/form-data; boundary=xyz")
    assert resp.status_code == 200, resp.text


def test_an_oversized_body_sent_slowly_is_cut_off(server):
    sent = 0

    def slow_body():
        nonlocal sent
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(40):  # 10 MiB offered in 256 KiB pieces, 2 MiB allowed
            sent += 1
            time.sleep(0.02)
            yield b"\xff" * (256 * 1024)

    try:
        resp = requests.post(server.url + "/upload", data=slow_body(), timeout=30,
                             headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert resp.status_code == 413
    except requests.ConnectionError:
        pass  # answered 413 and closed while we were still sending
    assert sent < 40
    assert_still_serving(server)


def test_a_client_that_disconnects_mid_upload_leaves_nothing_behind(server):
    import socket

    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                         b"Content-Length: 500000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                         b"filename=\"a.jpg\"\r\n\r\n" + GOOD[:2000])
    time.sleep(0.5)
    metrics = requests.get(server.url + "/metrics").text
    assert "inference_in_service 0.0" in metrics
    assert_still_serving(server)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2048), st.just(GOOD[:300]).map(lambda b: b + b"\0")),
       filename=st.text(max_size=40), content_type=st.sampled_from(["image/jpeg", "image/png", "text/plain", ""]))
def test_fuzz_upload_never_500s(server, data, filename, content_type):
    resp = requests.post(server.url + "/upload", files={"file": (filename or "f", data, content_type)}, timeout=30)
    assert resp.status_code in (200, 400, 413, 415), resp.text
    assert "error" in resp.json() or "predictions" in resp.json()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=1024), boundary=st.sampled_from(["xyz", "", "a" * 80, "--", "é"]))
def test_fuzz_raw_multipart_never_500s(server, body, boundary):
    resp = requests.post(server.url + "/upload", data=body, timeout=30,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}".encode()})
    assert resp.status_code in (400, 413, 415), resp.text


def test_atheris_fuzzes_the_decoder_without_a_crash(tmp_path):
    """Coverage-guided fuzzing of `decode_image` for a bounded number of runs."""
    script = ROOT / "tests" / "fuzz_decode.py"
    result = subprocess.run([sys.executable, str(script), "-runs=3000", "-max_len=4096", "-seed=1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 3000 runs" in result.stderr


# --- Hostile image servers -----------------------------------------------------------------------


def trickle(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(10):  # 1 byte a second, for at most 10 s
        handler.wfile.write(b"\xff")
        handler.wfile.flush()
        time.sleep(1)


def silent(handler):
    time.sleep(6)  # never answers within the fetch timeout


def endless(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    for _ in range(5000):  # up to 320 MB, as fast as it is read
        try:
            handler.wfile.write(b"\0" * 65536)
        except OSError:
            return


def short_body(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(GOOD) * 2))  # a lie
    handler.end_headers()
    handler.wfile.write(GOOD)


def huge_length(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(10**12))
    handler.end_headers()


def send_gzipped(handler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Encoding", "gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


BOMB = gzip.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9)  # 200 MB that gzip to ~200 KB


def gzip_bomb(handler):
    send_gzipped(handler, BOMB)


def gzipped_image(handler):
    send_gzipped(handler, gzip.compress(GOOD))


HOSTILE = {
    "/trickle.jpg": (trickle, 504),
    "/silent.jpg": (silent, 504),
    "/endless.jpg": (endless, 413),
    "/short.jpg": (short_body, 502),
    "/huge.jpg": (huge_length, 413),
    "/bomb.jpg": (gzip_bomb, 413),
    "/gzipped.jpg": (gzipped_image, 200),
    "/teapot.jpg": ((418, {}, b"I'm a teapot"), 502),
    "/down.jpg": ((503, {}, b"maintenance"), 502),
}


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_image_servers_end_within_the_timeout(server, image_server, path):
    route, status = HOSTILE[path]
    image_server.routes[path] = route
    before = rss_mb(server)
    t0 = time.monotonic()
    resp = requests.get(server.url + "/classify-url", params={"url": image_server.url(path)}, timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == status, resp.text
    assert elapsed < FETCH_TIMEOUT_S + 1.5
    assert rss_mb(server) - before < 100  # bounded: never the whole endless body or bomb
    assert_still_serving(server)


# --- Operations ----------------------------------------------------------------------------------


def test_metrics_in_prometheus_format(server):
    assert_still_serving(server)
    text = requests.get(server.url + "/metrics").text
    for name in ('http_requests_total{route="/upload",status="200"}', "http_request_duration_seconds_bucket",
                 "inference_queue_wait_seconds_bucket", "inference_batch_seconds_bucket",
                 "inference_batch_size_bucket", "inference_in_service", "inference_overload_rejections_total",
                 'model_info{backend="onnx"'):
        assert name in text, name
    assert 'route="other"' not in text or "/no-such" not in text  # no per-path label explosion


@pytest.fixture(scope="module")
def json_cors_server(tiny_export, tmp_path_factory):
    env = {"MODEL_PATH": str(tiny_export), "LOG_FORMAT": "json", "CORS_ORIGINS": "https://parents.example"}
    app = AppProcess(env, tmp_path_factory.mktemp("json") / "server.log")
    yield app.wait_ready()
    app.stop()


def test_json_logs_carry_the_request_id(json_cors_server):
    requests.get(json_cors_server.url + "/healthz", headers={"X-Request-ID": "trace-42"})
    time.sleep(0.2)
    lines = [json.loads(line) for line in json_cors_server.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "trace-42"]
    assert access and access[0]["path"] == "/healthz" and access[0]["status"] == 200 and "ms" in access[0]
    assert all("level" in line and "msg" in line for line in lines)


def test_cors_is_off_by_default_and_on_for_listed_origins(server, json_cors_server):
    origin = {"Origin": "https://parents.example"}
    assert "access-control-allow-origin" not in requests.get(server.url + "/model", headers=origin).headers
    allowed = requests.get(json_cors_server.url + "/model", headers=origin)
    assert allowed.headers["access-control-allow-origin"] == "https://parents.example"
    other = requests.get(json_cors_server.url + "/model", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_openapi_schema_and_schemathesis_against_the_live_server(server):
    schema = requests.get(server.url + "/openapi.json").json()
    assert {"/upload", "/classify-url", "/healthz", "/readyz", "/model"} <= set(schema["paths"])
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", server.url + "/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "25", "--request-timeout", "20"],
        capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.parametrize("name", ["kubernetes.yaml", "kubernetes-slim.yaml"])
def test_kubernetes_manifest_is_valid(name):
    result = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
                             f"deploy/{name}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = (ROOT / "deploy" / name).read_text()
    assert "path: /readyz" in manifest and "path: /healthz" in manifest and "HorizontalPodAutoscaler" in manifest


def test_uploads_that_trickle_are_let_go_at_the_body_deadline_while_others_are_served(tiny_export, tmp_path):
    """200 uploads sending a byte a second: each gets 408 and a closed connection once
    BODY_TIMEOUT_S has passed, while health checks and real uploads are answered meanwhile."""
    import asyncio

    from bench.slow_clients import measure

    app = AppProcess({"MODEL_PATH": str(tiny_export), "BODY_TIMEOUT_S": "3"}, tmp_path / "server.log").wait_ready()
    try:
        photo = image_bytes(synthetic_image((200, 40, 40), size=(64, 48)))
        out = asyncio.run(measure(app.port, 200, photo, probe_seconds=2.0))
    finally:
        app.stop()
    results = out["results"]
    assert [r.status for r in results] == [408] * 200 and all(r.closed for r in results)
    assert all(2.5 < r.seconds < 15 for r in results), sorted(r.seconds for r in results)[::40]
    assert len(out["health"]) >= 3 and len(out["uploads"]) >= 3  # all answered 200 while the 200 were held
