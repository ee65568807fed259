"""The HTTP API against a real `python -m app` on the tiny export."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image
from support import CLASS_COLOURS, image_bytes, png_claiming, synthetic_image

CLASSES = sorted(CLASS_COLOURS)


def upload(server, data: bytes, filename: str = "photo.jpg", field: str = "file") -> requests.Response:
    return requests.post(server.url + "/upload", files={field: (filename, data)}, timeout=30)


def assert_predictions(body: dict) -> list[list]:
    predictions = body["predictions"]
    assert sorted(label for label, _ in predictions) == CLASSES
    probs = [p for _, p in predictions]
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in probs)
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1, abs=1e-5)
    return predictions


def assert_error(resp: requests.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    return error


def test_health_ready_and_model(server, tiny_export):
    assert requests.get(server.url + "/healthz").json() == {"status": "ok"}
    assert requests.get(server.url + "/readyz").status_code == 200
    info = requests.get(server.url + "/model").json()
    assert info["classes"] == CLASSES
    assert info["card"]["classes"] == CLASSES
    from app.core.files import sha256_file

    assert info["sha256"] == sha256_file(tiny_export)


def test_upload_returns_sorted_probabilities_that_match_learn_predict(server, tiny_learner):
    img = synthetic_image(CLASS_COLOURS["reds"], size=(120, 90), seed=99)
    data = image_bytes(img)
    resp = upload(server, data)
    assert resp.status_code == 200
    predictions = assert_predictions(resp.json())
    # learn.predict on the same decoded image: the API must give the same probabilities.
    from app.core.images import decode_image

    _, _, probs = tiny_learner.predict(decode_image(data))
    expected = {label: float(p) for label, p in zip(tiny_learner.dls.vocab, probs, strict=True)}
    for label, p in predictions:
        assert p == pytest.approx(expected[label], abs=1e-4)


def test_classify_url_fetches_from_a_local_server(server, image_server):
    data = image_bytes(synthetic_image(CLASS_COLOURS["greens"], seed=5))
    image_server.routes["/green.jpg"] = (200, {"Content-Type": "image/jpeg"}, data)
    resp = requests.get(server.url + "/classify-url", params={"url": image_server.url("/green.jpg")})
    assert resp.status_code == 200, resp.text
    by_url = assert_predictions(resp.json())
    assert by_url == upload(server, data).json()["predictions"]
    assert "/green.jpg" in image_server.requests


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("JPEG", "CMYK"), ("PNG", "L"), ("GIF", "P"), ("WEBP", "RGB"),
                                      ("PNG", "I;16")])
def test_image_modes_and_formats_are_accepted(server, fmt, mode):
    img = synthetic_image(CLASS_COLOURS["blues"], size=(64, 64))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    else:
        img = img.convert(mode)
    resp = upload(server, image_bytes(img, fmt), filename=f"x.{fmt.lower()}")
    assert resp.status_code == 200, resp.text
    assert_predictions(resp.json())


def test_exif_orientation_is_applied_before_prediction(server):
    # Left half red, right half blue, stored rotated 90 degrees with an EXIF tag saying so.
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:, :40] = CLASS_COLOURS["reds"]
    arr[:, 40:] = CLASS_COLOURS["blues"]
    upright = Image.fromarray(arr)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways phone writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = image_bytes(stored, "JPEG", exif=exif, quality=95)
    plain = image_bytes(upright, "JPEG", quality=95)
    a = dict(map(tuple, upload(server, tagged).json()["predictions"]))
    b = dict(map(tuple, upload(server, plain).json()["predictions"]))
    c = dict(map(tuple, upload(server, image_bytes(stored, "JPEG", quality=95)).json()["predictions"]))
    for label in CLASSES:
        assert a[label] == pytest.approx(b[label], abs=2e-3)
    assert any(abs(a[label] - c[label]) > 1e-3 for label in CLASSES), "rotation should change the input"


def test_upload_errors(server):
    assert_error(upload(server, b"hello, not an image", "notes.txt"), 415, "unsupported_image")
    assert_error(upload(server, b"", "empty.jpg"), 415)
    assert_error(upload(server, image_bytes(synthetic_image((1, 2, 3)))[:300], "cut.jpg"), 415)
    assert_error(upload(server, png_claiming(10000, 6000), "bomb.png"), 413, "image_too_large")
    assert_error(upload(server, b"x" * (3 * 1024 * 1024), "big.jpg"), 413, "upload_too_large")
    assert_error(upload(server, image_bytes(synthetic_image((1, 2, 3))), field="photo"), 400, "missing_file")
    resp = requests.post(server.url + "/upload", data=b"raw", headers={"Content-Type": "multipart/form-data"})
    assert_error(resp, 400)
    assert_error(requests.get(server.url + "/upload"), 405)
    assert_error(requests.get(server.url + "/no-such-page"), 404)


def test_upload_over_the_limit_is_refused_while_streaming(server):
    """A chunked upload with no Content-Length is cut off once it passes the limit."""
    sent = 0

    def body():
        nonlocal sent
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        yield head
        for _ in range(64):  # 64 MiB offered, 2 MiB allowed
            sent += 1
            yield b"\0" * (1024 * 1024)

    try:
        resp = requests.post(server.url + "/upload", data=body(), timeout=30,
                             headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_error(resp, 413, "upload_too_large")
    except requests.ConnectionError:
        pass  # the server may close the connection as soon as it has answered
    assert sent < 64
    assert requests.get(server.url + "/healthz").status_code == 200


def test_classify_url_errors(server, image_server):
    image_server.routes["/page.html"] = (200, {"Content-Type": "text/html"}, b"<html><body>hi</body></html>")
    image_server.routes["/liar.jpg"] = (200, {"Content-Type": "image/jpeg"}, b"<html>not a jpeg</html>")
    image_server.routes["/broken"] = (500, {}, b"oops")

    def slow(handler):
        import time

        time.sleep(4)

    image_server.routes["/slow.jpg"] = slow

    def get(url):
        return requests.get(server.url + "/classify-url", params={"url": url} if url is not None else None, timeout=30)

    assert_error(get(None), 400, "missing_url")
    assert_error(get("not a url"), 400, "invalid_url")
    assert_error(get("ftp://example.com/bear.jpg"), 400, "invalid_url")
    assert_error(get(image_server.url("/missing.jpg")), 502, "remote_error")
    assert_error(get(image_server.url("/broken")), 502, "remote_error")
    assert_error(get(image_server.url("/page.html")), 502, "remote_not_image")
    assert_error(get(image_server.url("/liar.jpg")), 502, "remote_not_image")
    assert_error(get(image_server.url("/slow.jpg")), 504, "remote_timeout")
    closed = free_closed_port()
    assert_error(get(f"http://127.0.0.1:{closed}/x.jpg"), 502, "remote_unreachable")


def free_closed_port() -> int:
    from support import free_port

    return free_port()


def test_request_log_and_request_id(server):
    resp = requests.get(server.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    generated = requests.get(server.url + "/healthz").headers["X-Request-ID"]
    assert len(generated) == 32
    log = server.log()
    assert "GET /healthz 200" in log and "id=abc-123" in log
    assert "Traceback" not in log
    assert "%|" not in log  # no progress bars


def test_not_ready_before_the_model_is_loaded(tiny_export):
    """Without its lifespan (the model not loaded) the app answers 503 on everything model-bound."""
    from starlette.testclient import TestClient

    from app.serving.app import create_app
    from app.serving.config import Settings

    client = TestClient(create_app(Settings(model_path=tiny_export)))  # no `with`: lifespan not run
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert_error(client.post("/upload", files={"file": ("a.jpg", b"x")}), 503, "not_ready")
    assert_error(client.get("/classify-url", params={"url": "http://example.com/a.jpg"}), 503, "not_ready")
