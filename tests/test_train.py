"""`python -m app.train`: data checks, downloads, training, export and the committed default model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from support import (
    BEARS,
    NO_BEARS,
    ROOT,
    LocalHTTPServer,
    can_mount_read_only,
    image_bytes,
    make_dataset,
    synthetic_image,
)

from app.building.datasets import image_files
from app.building.recipe import make_dataloaders
from app.building.train import verify_images
from app.core.files import sha256_file
from app.core.images import NOT_AN_IMAGE

CLASSES = ["blues", "greens", "reds"]


def train_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_training_exports_a_learner_that_loads_in_a_fresh_process(tiny_export, tmp_path):
    out = tiny_export.parent
    for name in ("export.pkl", "model-card.json", "confusion-matrix.png", "top-losses.png"):
        assert (out / name).stat().st_size > 0, name
    card = json.loads((out / "model-card.json").read_text())
    assert card["classes"] == CLASSES
    assert card["export_sha256"] == sha256_file(tiny_export)
    assert card["images_per_class"] == {c: 10 for c in CLASSES}
    assert sum(map(sum, card["confusion_matrix"]["rows_actual_cols_predicted"])) == card["valid_images"] == 6
    assert 0 <= card["valid_accuracy"] <= 1
    assert card["valid_error_rate"] == pytest.approx(1 - card["valid_accuracy"], abs=1e-3)
    assert card["versions"]["fastai"] and card["command"].startswith("python -m app.train ")
    image = tmp_path / "probe.jpg"
    synthetic_image((40, 180, 60)).save(image)
    # Only fastai is imported explicitly: whatever the pickle needs must come from the app package.
    script = ("from fastai.learner import load_learner; from PIL import Image; import sys; "
              "learn = load_learner(sys.argv[1], cpu=True); "
              "print(learn.predict(Image.open(sys.argv[2]).convert('RGB'))[0])")
    result = subprocess.run([sys.executable, "-c", script, str(tiny_export), str(image)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] in CLASSES


def test_verify_moves_what_the_server_refuses_to_rejected(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    good = image_bytes(synthetic_image((1, 2, 3), size=(64, 64)))
    (data / "reds" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "blues" / "notes.jpg").write_text("this is a text file")
    synthetic_image((1, 2, 3)).save(data / "greens" / "scan.tif")  # decodes in Pillow; the server refuses TIFF
    rejected = dict((p.relative_to(data).as_posix(), why) for p, why in verify_images(data, CLASSES))
    assert sorted(rejected) == ["_rejected/blues/notes.jpg", "_rejected/greens/scan.tif",
                                "_rejected/reds/truncated.jpg"]
    assert rejected["_rejected/greens/scan.tif"] == NOT_AN_IMAGE  # the words an upload of it gets
    assert not (data / "reds" / "truncated.jpg").exists()
    assert (data / "_rejected" / "blues" / "notes.jpg").read_text() == "this is a text file"
    assert len(list((data / "reds").iterdir())) == 3


def trickle(body: bytes, chunk: int = 4096, pause: float = 0.002, content_type: str = "image/jpeg"):
    """A route that sends `body` in small chunks with pauses, as a slow image host does."""

    def send(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for start in range(0, len(body), chunk):
                handler.wfile.write(body[start:start + chunk])
                handler.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (a body over its size cap)

    return send


def large_photos() -> list[bytes]:
    """Photos of a few hundred KB: real bear photos where ../shared is here, else noisy 1 MP ones."""
    if BEARS.is_dir():
        found = sorted((p for p in (BEARS / "grizzly").iterdir() if 150_000 < p.stat().st_size < 900_000),
                       key=lambda p: p.name)[:3]
        if len(found) == 3:
            return [p.read_bytes() for p in found]
    return [image_bytes(synthetic_image((90, 60, 30), size=(1200, 900), seed=i), quality=95) for i in range(3)]


def test_url_download_keeps_large_photos_sent_in_small_chunks_and_counts_failures_by_reason(tmp_path):
    import asyncio

    from app.building.download import download_images, parse_url_specs

    photos = large_photos()
    assert all(len(photo) > 150_000 for photo in photos)

    def slow(handler) -> None:
        time.sleep(3)

    server = LocalHTTPServer(routes={
        **{f"/bear-{i}.jpg": trickle(photo) for i, photo in enumerate(photos)},
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html>no</html>"),
        "/huge.jpg": trickle(photos[0] * 40),
        "/slow.jpg": slow,
    })
    try:
        urls = tmp_path / "grizzly.txt"
        paths = [f"/bear-{i}.jpg" for i in range(3)] + ["/gone.jpg", "/page.html", "/huge.jpg", "/slow.jpg"]
        urls.write_text("\n".join(server.url(p) for p in paths) + "\n")
        report = asyncio.run(download_images(parse_url_specs([f"grizzly={urls}"]), tmp_path / "data", 10,
                                             timeout_s=2, max_bytes=len(photos[0]) * 10))
    finally:
        server.close()
    saved = sorted((tmp_path / "data" / "grizzly").iterdir())
    assert sorted(p.read_bytes() for p in saved) == sorted(photos)  # every byte of every photo
    assert report.saved == {"grizzly": 3}
    assert report.failed == {"HTTP 404": 1, "not an image": 1, "too large": 1, "timeout": 1}
    assert report.summary() == "3 saved, 4 failed (1 HTTP 404, 1 not an image, 1 timeout, 1 too large)"


@pytest.mark.parametrize("setup,message", [
    ("missing", "data folder not found"),
    ("one_class", "need at least two class folders"),
    ("few_images", "too few images"),
    ("bad_url_file", "cannot read URL file"),
    ("bad_url_spec", "--urls takes CLASS=FILE"),
    ("missing_unfamiliar", "folder of unfamiliar photos not found"),
    ("loose_photos", "the 6 photos directly in it must go into one sub-folder per class"),
    ("existing_export", "already exists: pass --overwrite"),
    ("out_is_a_file", "is a file, not a folder"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, setup, message):
    data = tmp_path / "data"
    out = tmp_path / "out"
    args = [str(data), "--out", str(out)]
    if setup == "one_class":
        make_dataset(data, per_class=6)
        for cls in ("greens", "reds"):
            for f in (data / cls).iterdir():
                f.unlink()
            (data / cls).rmdir()
    elif setup == "few_images":
        make_dataset(data, per_class=2)
    elif setup == "bad_url_file":
        args += ["--urls", f"teddys={tmp_path / 'nope.txt'}"]
    elif setup == "bad_url_spec":
        args += ["--urls", "teddys"]
    elif setup == "missing_unfamiliar":
        make_dataset(data, per_class=6)
        args += ["--unfamiliar", str(tmp_path / "nope")]
    elif setup == "loose_photos":
        data.mkdir()
        for i in range(6):
            synthetic_image((1, 2, 3), seed=i).save(data / f"{i}.jpg")
    elif setup == "existing_export":
        make_dataset(data, per_class=6)
        out.mkdir()
        (out / "export.pkl").write_bytes(b"the model someone shipped")
    elif setup == "out_is_a_file":
        make_dataset(data, per_class=6)
        out.write_text("not a folder")
    result = train_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


@pytest.mark.skipif(not can_mount_read_only(), reason="needs a private read-only mount (root in CI)")
def test_a_read_only_out_is_one_line_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    locked = tmp_path / "locked"
    locked.mkdir()
    result = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"',
                             str(locked), sys.executable, "-m", "app.train", str(data), "--out", str(locked / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: cannot write to --out {locked / 'out'}: Read-only file system"


def test_options_are_never_abbreviated_and_help_shows_every_default():
    result = train_cli("data", "--epoch", "1")
    assert result.returncode == 2 and "unrecognized arguments: --epoch" in result.stderr
    help_text = " ".join(train_cli("--help").stdout.split())
    for shown in ("--out OUT where the export, detector and card go (default: trained)",
                  "--freeze-epochs FREEZE_EPOCHS with --head trained: epochs training the head only (default: 8)",
                  "offline for efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        assert shown in help_text, shown
    for command in ("app.clean", "app.evaluate"):
        result = subprocess.run([sys.executable, "-m", command, "data", "--thread", "1"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "unrecognized arguments: --thread" in result.stderr, command


def test_training_says_what_it_wrote_and_what_to_run_next_without_progress_bars(tiny_export):
    printed = (tiny_export.parent.parent / "train-output.txt").read_text()
    out = tiny_export.parent
    assert f"wrote {out / 'export.pkl'}, {out / 'export.detector.npz'}, {out / 'model-card.json'}" in printed
    for step in ("python -m app.clean", "python -m app.evaluate HOLDOUT --model", f"MODEL_PATH={tiny_export}"):
        assert step in printed, step
    assert "\r" not in printed and "\u2588" not in printed and "\u2501" not in printed  # no bar, no stray block


def test_no_progress_bars_in_a_log_file(tmp_path):
    """Output that is not a terminal gets the summary, not thousands of progress-bar redraws."""
    data = make_dataset(tmp_path / "data", per_class=6)
    result = train_cli(str(data), "--arch", "tiny_cnn", "--no-pretrained", "--epochs", "2", "--freeze-epochs", "0",
                       "--size", "32", "--bs", "8", "--workers", "0", "--out", str(tmp_path / "out"), timeout=180)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\r" not in output and "\u2588" not in output and "validation accuracy" in result.stdout


def test_same_data_and_seed_give_the_same_split(tmp_path):
    from app.building.datasets import image_files

    data = make_dataset(tmp_path / "data", per_class=10)
    files = [p for cls in CLASSES for p in image_files(data / cls)]

    def valid_items(seed):
        dls = make_dataloaders(data, list(reversed(files)) if seed == "rev" else files, 32, 8, 42, 0.2, 0)
        return sorted(map(str, dls.valid_ds.items))

    assert valid_items(42) == valid_items(42)
    assert len(valid_items(42)) == 6


MODEL = ROOT / "models" / "export.pkl"


def test_committed_default_model_matches_its_card():
    from fastai.learner import load_learner

    card = json.loads((ROOT / "models" / "model-card.json").read_text())
    learn = load_learner(MODEL, cpu=True)
    assert list(learn.dls.vocab) == ["black", "grizzly", "teddys"] == card["classes"]
    assert card["export_sha256"] == sha256_file(MODEL)
    assert card["valid_accuracy"] >= 0.985
    assert card["architecture"] == "efficientnet_lite0"
    assert card["calibration"]["applied"] and card["calibration"]["valid_ece"]["after"] < card["calibration"][
        "valid_ece"]["before"]
    assert card["detector"]["method"] == "knn-cosine" and card["detector"]["valid_false_flag_rate"] <= 0.03
    assert card["detector"]["unfamiliar_photos"]["overall"]["rate"] >= 0.95


@pytest.mark.skipif(not BEARS.is_dir(), reason=NO_BEARS)
def test_default_model_recognises_the_shared_bear_photos():
    """A sanity check on the real photos (most of which it was trained on, so this is not the
    accuracy figure: that is the validation accuracy in the model card)."""
    from fastai.learner import load_learner
    from PIL import Image

    learn = load_learner(MODEL, cpu=True)
    right = total = 0
    for cls in ("black", "grizzly", "teddys"):
        for path in sorted((BEARS / cls).iterdir())[:10]:
            with learn.no_bar():
                label = learn.predict(Image.open(path).convert("RGB"))[0]
            right += label == cls
            total += 1
    assert right / total >= 0.9


def test_heic_is_trained_on_validated_and_in_the_detector_and_tiff_is_refused_everywhere(tmp_path):
    """One list of formats (app/core/formats.py): what the server reads is trained on and measured,
    what it refuses is refused by every command, with the server's words."""
    from app.building.datasets import split
    from app.building.evaluate import load_model
    from app.building.measure import evaluate
    from app.building.ranking import score_folder
    from app.train import main

    data = make_dataset(tmp_path / "data", per_class=10)
    for photo in sorted((data / "reds").iterdir()):  # an iPhone's photos of one class
        Image.open(photo).save(photo.with_suffix(".heic"))
        photo.unlink()
    synthetic_image((40, 180, 60), seed=99).save(data / "greens" / "scan.tif")
    out = tmp_path / "out"
    assert main([str(data), "--arch", "tiny_cnn", "--no-pretrained", "--epochs", "2", "--freeze-epochs", "0",
                 "--size", "32", "--bs", "8", "--workers", "0", "--quiet", "--out", str(out)]) == 0
    card = json.loads((out / "model-card.json").read_text())
    assert card["images_per_class"] == {"blues": 10, "greens": 10, "reds": 10}  # the TIFF is not among them
    assert (data / "_rejected" / "greens" / "scan.tif").exists()
    files = [p for cls in CLASSES for p in image_files(data / cls)]
    train, valid = split(files, 0.2, 42)
    assert any(p.suffix == ".heic" for p in train) and any(p.suffix == ".heic" for p in valid)
    assert card["valid_images"] == len(valid) and card["train_images"] == len(train)
    assert card["detector"]["reference_images"] == len(train)  # every training photo, HEIC included

    # Evaluation and cleaning refuse the TIFF as undecodable, and read the HEIC photos.
    (data / "_rejected" / "greens" / "scan.tif").rename(data / "greens" / "scan.tif")
    predictor, detector, model = load_model(out / "export.pkl", threads=1)
    report = evaluate(predictor, detector, model.vocab, data)
    assert [Path(p).name for p in report["undecodable"]] == ["scan.tif"] and report["images"] == 30
    assert score_folder(data, threads=1).undecodable == ["greens/scan.tif"]
