"""Slow and silent connections: HEADER_TIMEOUT_S, with real sockets to a real server, for each of
uvicorn's two HTTP parsers (httptools and h11 must behave the same).

Every connection goes to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import BinaryIO

import pytest
from support import AppProcess, LocalHTTPServer, image_bytes, synthetic_image

HEADER_TIMEOUT_S = 1.5
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PHOTO = image_bytes(synthetic_image((200, 40, 40), size=(64, 48)))


@pytest.fixture(scope="module", params=["httptools", "h11"])
def header_server(request, tiny_export, tmp_path_factory):
    log = tmp_path_factory.mktemp(f"headers-{request.param}") / "server.log"
    app = AppProcess({"MODEL_PATH": str(tiny_export), "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
                      "HTTP_IMPLEMENTATION": request.param, "ALLOW_PRIVATE_URLS": "true",
                      "FETCH_TIMEOUT_S": "20"}, log)
    yield app.wait_ready()
    app.stop()


def connect(server: AppProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, received = time.monotonic(), b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - start


def read_response(reader: BinaryIO) -> tuple[int, bytes]:
    """One whole response (status and body, by its Content-Length) from a kept-alive connection,
    read through `sock.makefile("rb")` so that a response arriving with the next one is kept apart."""
    status_line = reader.readline()
    assert status_line, "closed before a response"
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), reader.read(length)


def assert_closed_at_the_deadline(seconds: float) -> None:
    assert HEADER_TIMEOUT_S * 0.9 <= seconds <= HEADER_TIMEOUT_S + 2, seconds


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(header_server):
    with connect(header_server) as sock:
        received, seconds = read_until_closed(sock)
    assert received == b""  # owed no answer: it asked nothing
    assert_closed_at_the_deadline(seconds)


def test_headers_that_trickle_get_408_and_a_closed_connection(header_server):
    with connect(header_server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        for byte in b"Host: 127.0.0.1\r\nUser-Agent: a-very-slow-client\r\n":
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.25)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server has answered
            except TimeoutError:
                continue
        sock.settimeout(HEADER_TIMEOUT_S + 5)
        received, _ = read_until_closed(sock)
        seconds = time.monotonic() - start
    assert received.startswith(b"HTTP/1.1 408 "), received[:80]
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
    assert_closed_at_the_deadline(seconds)


def test_a_request_line_that_never_ends_is_closed_without_an_answer(header_server):
    with connect(header_server) as sock:
        sock.sendall(b"GET /heal")
        received, seconds = read_until_closed(sock)
    assert received == b""
    assert_closed_at_the_deadline(seconds)


def test_each_response_restarts_the_deadline_for_the_next_request(header_server):
    """Requests that come promptly after each response are answered however long the connection
    lives; the deadline counts from the last response."""
    with connect(header_server) as sock, sock.makefile("rb") as reader:
        for _ in range(3):
            sock.sendall(REQUEST)
            assert read_response(reader) == (200, b'{"status":"ok"}')
            time.sleep(HEADER_TIMEOUT_S * 0.6)  # 1.8 deadlines in all, none of them between requests
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost")
        received, seconds = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT_S * 0.3 <= seconds <= HEADER_TIMEOUT_S * 0.4 + 2, seconds  # 0.6 of it had passed


def test_pipelined_requests_are_all_answered(header_server):
    with connect(header_server) as sock, sock.makefile("rb") as reader:
        sock.sendall(REQUEST * 3)
        assert [read_response(reader)[0] for _ in range(3)] == [200] * 3


def test_a_body_slower_than_the_header_deadline_is_not_cut_off(header_server):
    """Once the headers are in, only BODY_TIMEOUT_S (60 s here) applies to the body."""
    boundary = b"slowbody"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + PHOTO + b"\r\n--" + boundary + b"--\r\n")
    with connect(header_server) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary="
                     + boundary + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        pieces = 6
        for start in range(0, len(body), -(-len(body) // pieces)):
            sock.sendall(body[start:start - (-len(body) // pieces)])
            time.sleep(HEADER_TIMEOUT_S * 1.5 / pieces)
        with sock.makefile("rb") as reader:
            status, answer = read_response(reader)
    assert status == 200, answer
    assert "predictions" in json.loads(answer)


def test_a_slow_response_is_not_cut_off(header_server):
    """A photo whose server takes 1.5 deadlines to answer is still classified."""

    def slow_photo(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(HEADER_TIMEOUT_S * 1.5)
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(PHOTO)))
        handler.end_headers()
        handler.wfile.write(PHOTO)

    photos = LocalHTTPServer(routes={"/slow.jpg": slow_photo})
    try:
        with connect(header_server) as sock:
            url = photos.url("/slow.jpg")
            sock.sendall(f"GET /classify-url?url={url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            with sock.makefile("rb") as reader:
                status, answer = read_response(reader)
    finally:
        photos.close()
    assert status == 200, answer
    assert "predictions" in json.loads(answer)


def test_the_parser_and_the_deadline_are_settings():
    from app.serving.config import ConfigError, Settings

    settings = Settings.from_env({"HTTP_IMPLEMENTATION": "H11", "HEADER_TIMEOUT_S": "2.5"})
    assert (settings.http_implementation, settings.header_timeout_s) == ("h11", 2.5)
    assert Settings().header_timeout_s == 10
    with pytest.raises(ConfigError, match="HTTP_IMPLEMENTATION must be one of auto, httptools, h11"):
        Settings.from_env({"HTTP_IMPLEMENTATION": "nginx"})
    with pytest.raises(ConfigError, match="HEADER_TIMEOUT_S must be at least 0.1"):
        Settings.from_env({"HEADER_TIMEOUT_S": "0"})
