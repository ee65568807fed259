"""Corrections from use (`POST /feedback`) against a real `python -m app`: off by default, kept only
with FEEDBACK_DIR, without any of the photo's metadata, under names the server makes, within a cap."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import requests
from PIL import ExifTags, Image, ImageCms
from support import ROOT, AppProcess, image_bytes, synthetic_image

NAME = re.compile(r"^feedback-\d{8}T\d{12}Z-[0-9a-f]{8}$")
SECRETS = (b"SecretCam", b"secret-comment", b"secretxmp")


def photo_with_metadata() -> bytes:
    """A 60x40 red JPEG with a blue top-left corner, stored as a phone does: sideways with an
    orientation tag (6: turn 90 degrees clockwise), GPS coordinates, a camera name, a comment, an
    ICC profile and XMP."""
    img = Image.new("RGB", (60, 40), (200, 40, 40))
    img.paste((40, 60, 200), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "SecretCam"
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description secretxmp="1"/></rdf:RDF></x:xmpmeta>'
    data = image_bytes(img, "JPEG", exif=exif.tobytes(), comment=b"secret-comment", icc_profile=icc, xmp=xmp)
    assert all(secret in data for secret in SECRETS)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    return data


def send(server, label: str | None, data: bytes | None = None, filename: str = "photo.jpg",
         url: str | None = None) -> requests.Response:
    fields: dict = {}
    if label is not None:
        fields["label"] = (None, label)
    if data is not None:
        fields["file"] = (filename, data)
    if url is not None:
        fields["url"] = (None, url)
    return requests.post(server.url + "/feedback", files=fields, timeout=30)


def kept_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def feedback_server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("feedback")
    folder = root / "corrections"
    app = AppProcess({"MODEL_PATH": str(tiny_export), "FEEDBACK_DIR": str(folder), "ALLOW_PRIVATE_URLS": "true",
                      "MAX_UPLOAD_MB": "2"}, root / "server.log")
    app.wait_ready()
    app.folder = folder
    yield app
    app.stop()


def clear(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()


def test_off_by_default_the_route_is_404_and_the_page_is_told(server):
    assert requests.get(server.url + "/model").json()["feedback"] is False
    resp = send(server, "reds", image_bytes(synthetic_image((200, 40, 40))))
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "feedback_off"


def test_off_a_server_writes_no_photo_anywhere(model_copy, tmp_path):
    """Without FEEDBACK_DIR, corrections and uploads leave every folder the server may write to (its
    model folder, home, temporary and cache folders) exactly as they were once it was ready."""
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), temp.mkdir()
    app = AppProcess({"MODEL_PATH": str(model_copy), "HOME": str(home), "TMPDIR": str(temp),
                      "XDG_CACHE_HOME": str(home / ".cache")}, tmp_path / "server.log").wait_ready()
    try:
        def snapshot() -> dict[str, tuple[int, int]]:
            return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
                    if p.is_file() and p.name != "server.log"}

        before = snapshot()
        photo = photo_with_metadata()
        for _ in range(3):
            assert send(app, "reds", photo).status_code == 404
            assert requests.post(app.url + "/upload", files={"file": ("a.jpg", photo)}).status_code == 200
        assert snapshot() == before
        assert not any(secret in Path(p).read_bytes() for p in before for secret in SECRETS)
    finally:
        app.stop()


def test_classifying_keeps_nothing_even_when_corrections_are_on(feedback_server):
    clear(feedback_server.folder)
    assert requests.get(feedback_server.url + "/model").json()["feedback"] is True
    for seed in range(3):
        data = image_bytes(synthetic_image((200, 40, 40), seed=seed))
        assert requests.post(feedback_server.url + "/upload", files={"file": ("a.jpg", data)}).status_code == 200
    assert kept_files(feedback_server.folder) == {}


def test_a_correction_is_kept_upright_without_gps_exif_xmp_icc_or_comment(feedback_server, tiny_export):
    clear(feedback_server.folder)
    resp = send(feedback_server, "blues", photo_with_metadata(), filename="IMG_0001.jpg")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert NAME.match(body["id"]) and body["label"] == "blues"
    files = kept_files(feedback_server.folder)
    assert sorted(files) == [body["id"] + ".jpg", body["id"] + ".json"]

    kept = files[body["id"] + ".jpg"]
    assert not any(secret in kept for secret in SECRETS)
    assert b"Exif" not in kept and b"ICC_PROFILE" not in kept and b"http://ns.adobe.com/xap" not in kept
    img = Image.open(io.BytesIO(kept))
    assert img.format == "JPEG" and not dict(img.getexif())
    assert not {"exif", "xmp", "comment", "icc_profile"} & set(img.info)
    # Turned upright before the orientation tag was dropped: 40 wide, the blue corner top right.
    assert img.size == (40, 60)
    r, g, b = img.getpixel((35, 5))
    assert b > 150 and r < 100

    record = json.loads(files[body["id"] + ".json"])
    model = requests.get(feedback_server.url + "/model").json()
    assert record["photo"] == body["id"] + ".jpg"
    assert record["label"] == "blues"
    assert record["predictions"] == body["predictions"] and record["answer"] == body["predictions"][0][0]
    assert record["unfamiliar"] == body["unfamiliar"] and isinstance(record["unfamiliar"], bool)
    assert record["model_sha256"] == model["sha256"]
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(record["time"])).total_seconds()) < 120
    assert "IMG_0001" not in json.dumps(record)  # the client's file name is not kept either
    for path in feedback_server.folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_path_like_file_names_never_choose_where_a_photo_goes(feedback_server):
    clear(feedback_server.folder)
    outside = feedback_server.folder.parent
    before = sorted(p.name for p in outside.iterdir())
    for name in ("../../escape.jpg", "..\\escape.jpg", "/tmp/escape.jpg", "sub/dir/x.jpg", ".json"):
        resp = send(feedback_server, "reds", image_bytes(synthetic_image((200, 40, 40))), filename=name)
        assert resp.status_code == 201, resp.text
        assert NAME.match(resp.json()["id"])
    assert sorted(p.name for p in outside.iterdir()) == before
    files = kept_files(feedback_server.folder)
    assert len(files) == 10 and all("/" not in name and NAME.match(name.rsplit(".", 1)[0]) for name in files)
    assert not Path("/tmp/escape.jpg").exists()


@pytest.mark.parametrize("label", ["purple", "REDS", "../reds", "", "reds ", "none"])
def test_a_label_that_is_not_a_class_is_a_422_and_keeps_nothing(feedback_server, label):
    clear(feedback_server.folder)
    resp = send(feedback_server, label, image_bytes(synthetic_image((200, 40, 40))))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "bad_label" and "'reds'" in error["message"] and "none of these" in error["message"]
    assert kept_files(feedback_server.folder) == {}


def test_bad_requests_are_clear_4xx_and_keep_nothing(feedback_server, image_server):
    clear(feedback_server.folder)
    photo = image_bytes(synthetic_image((200, 40, 40)))
    image_server.routes["/fb.jpg"] = (200, {"Content-Type": "image/jpeg"}, photo)
    cases = [
        (send(feedback_server, None, photo), 422, "bad_label"),
        (send(feedback_server, "reds"), 400, "missing_file"),
        (send(feedback_server, "reds", photo, url=image_server.url("/fb.jpg")), 400, "missing_file"),
        (send(feedback_server, "reds", b"not an image at all"), 415, "unsupported_image"),
        (send(feedback_server, "reds", b"\0" * (3 * 1024 * 1024)), 413, "upload_too_large"),
        (requests.post(feedback_server.url + "/feedback", data={"label": "reds"}), 400, None),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, resp.text
        if code:
            assert resp.json()["error"]["code"] == code
    assert kept_files(feedback_server.folder) == {}
    assert requests.get(feedback_server.url + "/readyz").status_code == 200


def test_none_of_these_and_a_photo_from_a_url_are_kept(feedback_server, image_server):
    clear(feedback_server.folder)
    image_server.routes["/other.png"] = (200, {"Content-Type": "image/png"},
                                         image_bytes(synthetic_image((128, 128, 128)), "PNG"))
    resp = send(feedback_server, "none of these", url=image_server.url("/other.png"))
    assert resp.status_code == 201, resp.text
    assert resp.json()["label"] == "none of these"
    record = json.loads((feedback_server.folder / (resp.json()["id"] + ".json")).read_text())
    assert record["label"] is None
    assert Image.open(feedback_server.folder / record["photo"]).format == "JPEG"
    resp = send(feedback_server, "reds", url=image_server.url("/missing.jpg"))
    assert resp.status_code == 502


def test_corrections_are_counted_by_label_and_described_in_openapi(feedback_server):
    before = requests.get(feedback_server.url + "/metrics").text
    assert send(feedback_server, "greens", image_bytes(synthetic_image((40, 180, 60)))).status_code == 201
    after = requests.get(feedback_server.url + "/metrics").text

    def count(text: str) -> float:
        match = re.search(r'^feedback_corrections_total\{label="greens"\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    assert count(after) == count(before) + 1
    operation = requests.get(feedback_server.url + "/openapi.json").json()["paths"]["/feedback"]["post"]
    assert {"201", "404", "422", "507"} <= set(map(str, operation["responses"]))
    assert "label" in operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_a_full_folder_refuses_with_507_and_loses_nothing(tiny_export, tmp_path):
    folder = tmp_path / "corrections"
    app = AppProcess({"MODEL_PATH": str(tiny_export), "FEEDBACK_DIR": str(folder), "FEEDBACK_MAX_MB": "0.03"},
                     tmp_path / "server.log").wait_ready()
    try:
        statuses = []
        for seed in range(12):
            resp = send(app, "reds", image_bytes(synthetic_image((200, 40, 40), size=(120, 90), seed=seed)))
            statuses.append(resp.status_code)
            if resp.status_code == 507:
                assert resp.json()["error"]["code"] == "feedback_full"
                assert "full" in resp.json()["error"]["message"]
                break
            assert resp.status_code == 201, resp.text
        assert statuses[-1] == 507 and statuses.count(201) >= 1
        kept = kept_files(folder)
        assert sum(map(len, kept.values())) <= 0.03 * 1024 * 1024
        for _ in range(3):  # refusing again changes nothing already kept
            assert send(app, "reds", image_bytes(synthetic_image((200, 40, 40), size=(120, 90)))).status_code == 507
        assert kept_files(folder) == kept
        photo = image_bytes(synthetic_image((200, 40, 40)))
        assert requests.post(app.url + "/upload", files={"file": ("a.jpg", photo)}).status_code == 200
    finally:
        app.stop()


def test_a_feedback_folder_that_cannot_be_written_stops_start_up_with_one_line(tiny_export):
    env = {"MODEL_PATH": str(tiny_export), "FEEDBACK_DIR": "/proc/no-such-folder", "PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: FEEDBACK_DIR /proc/no-such-folder cannot be created or written to by this user"]
