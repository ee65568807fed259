"""`python -m app.predict`: many photos classified from the command line with the answers the
server gives, a bundle without torch, unreadable files listed without stopping the run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from support import HEAVY, ROOT, AppProcess, image_bytes, synthetic_image, unimportable_env


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Photos of several sizes and formats in nested folders, and two files that are no photos."""
    root = tmp_path_factory.mktemp("photos")
    (root / "garden" / "deeper").mkdir(parents=True)
    colours = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (120, 120, 30), (90, 20, 160)]
    for i, colour in enumerate(colours):
        img = synthetic_image(colour, size=(60 + 40 * i, 50 + 15 * i), seed=i)
        folder = root if i < 2 else root / "garden" if i < 4 else root / "garden" / "deeper"
        (folder / f"p{i}.{'png' if i % 2 else 'jpg'}").write_bytes(image_bytes(img, "PNG" if i % 2 else "JPEG"))
    (root / "garden" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.png").write_text("just text")
    return root


def predict(*args: str, without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **(unimportable_env(without) if without else {})}
    return subprocess.run([sys.executable, "-m", "app.predict", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def bundle_server(tiny_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("predict-server") / "server.log"
    app = AppProcess({"MODEL_PATH": str(tiny_export.parent / "bundle")}, log)
    yield app.wait_ready(learner=False)
    app.stop()


def test_the_answers_are_those_of_post_upload(tiny_export, photo_folder, bundle_server):
    """A bundle, with torch and fastai unimportable, in batches of 2: each photo's JSON is what the
    server answers for the same file, and each unreadable one has the server's error code."""
    result = predict(str(photo_folder), "--model", str(tiny_export.parent / "bundle"), "--jsonl", "--batch", "2",
                     without=HEAVY)
    assert result.returncode == 1, result.stderr  # two files are not photos
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 7 and "5 of 7 photos classified" in result.stderr
    assert "\r" not in result.stderr  # no progress count when stderr is not a terminal
    for answer in answers:
        path = Path(answer.pop("path"))
        upload = requests.post(bundle_server.url + "/upload", files={"file": (path.name, path.read_bytes())},
                               timeout=30)
        server = upload.json()
        if "error" in answer:
            assert upload.status_code == 415 and answer["error"]["code"] == server["error"]["code"]
            continue
        assert upload.status_code == 200
        assert [label for label, _ in answer["predictions"]] == [label for label, _ in server["predictions"]]
        assert max(abs(a[1] - b[1]) for a, b in zip(answer["predictions"], server["predictions"], strict=True)) < 1e-6
        assert answer["unfamiliar"] == server["unfamiliar"]


def test_an_export_gives_the_same_answers_as_its_bundle_into_a_csv(tiny_export, photo_folder, tmp_path):
    vocab = json.loads((tiny_export.parent / "model-card.json").read_text())["classes"]
    from_export, from_bundle = tmp_path / "export.csv", tmp_path / "bundle.csv"
    ran = predict(str(photo_folder / "p0.jpg"), str(photo_folder / "garden"), "--model", str(tiny_export),
                  "--csv", str(from_export))
    assert ran.returncode == 1 and f"{photo_folder / 'garden' / 'broken.jpg'}\terror\t" in ran.stderr
    assert ran.stdout == ""
    predict(str(photo_folder / "p0.jpg"), str(photo_folder / "garden"), "--model", str(tiny_export.parent / "bundle"),
            "--csv", str(from_bundle), without=HEAVY)
    export_rows = list(csv.DictReader(from_export.open()))
    bundle_rows = list(csv.DictReader(from_bundle.open()))
    assert [r["path"] for r in export_rows] == [str(photo_folder / "p0.jpg"),
                                                *map(str, sorted((photo_folder / "garden").rglob("*.*")))]
    assert list(export_rows[0]) == ["path", "label", "probability", "unfamiliar", *vocab, "error"]
    for ours, theirs in zip(export_rows, bundle_rows, strict=True):
        assert ours["label"] == theirs["label"] and ours["error"] == theirs["error"]
        if not ours["error"]:
            assert max(abs(float(ours[c]) - float(theirs[c])) for c in vocab) < 1e-5


def test_the_default_output_is_one_line_a_photo(tiny_export, photo_folder):
    result = predict(str(photo_folder / "p1.png"), "--model", str(tiny_export.parent / "bundle"), without=HEAVY)
    assert result.returncode == 0, result.stderr
    path, label, probability, *flag = result.stdout.strip().split("\t")
    assert path == str(photo_folder / "p1.png") and 0 < float(probability) <= 1 and flag in ([], ["unfamiliar"])
    assert label in json.loads((tiny_export.parent / "model-card.json").read_text())["classes"]


@pytest.mark.parametrize("args,message", [
    (["nowhere"], "no such file or folder: nowhere"),
    (["EMPTY"], "no photos in"),
    (["PHOTO", "--model", "EMPTY"], "is a folder, not an export"),
    (["PHOTO", "--batch", "0"], "--batch must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(photo_folder, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(photo_folder / "p0.jpg") if a == "PHOTO" else a
            for a in args]
    result = predict(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_photo_copied_anywhere_is_read(tiny_export, photo_folder, tmp_path):
    """Explicit files are taken whatever their name (the server reads what the bytes are)."""
    odd = Path(shutil.copyfile(photo_folder / "p0.jpg", tmp_path / "photo.download"))
    result = predict(str(odd), "--model", str(tiny_export.parent / "bundle"), "--jsonl", without=HEAVY)
    assert result.returncode == 0 and "predictions" in json.loads(result.stdout)
