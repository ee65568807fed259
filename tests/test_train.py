"""`python -m app.train`: data checks, downloads, training, export and the committed default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import BEARS, NO_BEARS, ROOT, LocalHTTPServer, image_bytes, make_dataset, synthetic_image

from app.model_store import sha256_file
from app.train import make_dataloaders, verify_images

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


def test_verify_moves_undecodable_files_to_rejected(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    good = image_bytes(synthetic_image((1, 2, 3), size=(64, 64)))
    (data / "reds" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "blues" / "notes.jpg").write_text("this is a text file")
    rejected = verify_images(data, CLASSES)
    assert sorted(p.relative_to(data).as_posix() for p in rejected) == ["_rejected/blues/notes.jpg",
                                                                          "_rejected/reds/truncated.jpg"]
    assert not (data / "reds" / "truncated.jpg").exists()
    assert (data / "_rejected" / "blues" / "notes.jpg").read_text() == "this is a text file"
    assert len(list((data / "reds").iterdir())) == 3


def test_url_download_saves_images_and_counts_failures(tmp_path):
    server = LocalHTTPServer(routes={
        "/bear.jpg": (200, {"Content-Type": "image/jpeg"}, image_bytes(synthetic_image((90, 60, 30)))),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html>no</html>"),
    })
    try:
        urls = tmp_path / "teddys.txt"
        urls.write_text("\n".join(server.url(p) for p in ("/bear.jpg", "/gone.jpg", "/page.html")) + "\n")
        import asyncio

        from app.train import download_images, parse_url_specs

        report = asyncio.run(download_images(parse_url_specs([f"teddys={urls}"]), tmp_path / "data", 10,
                                             show_progress=False))
    finally:
        server.close()
    assert report.saved["teddys"] == 1 and report.failed["teddys"] == 2
    saved = list((tmp_path / "data" / "teddys").iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".jpg"


@pytest.mark.parametrize("setup,message", [
    ("missing", "data folder not found"),
    ("one_class", "need at least two class folders"),
    ("few_images", "too few images"),
    ("bad_url_file", "cannot read URL file"),
    ("bad_url_spec", "--urls takes CLASS=FILE"),
    ("missing_unfamiliar", "folder of unfamiliar photos not found"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, setup, message):
    data = tmp_path / "data"
    args = [str(data)]
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
    result = train_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_same_data_and_seed_give_the_same_split(tmp_path):
    from app.train import image_files

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
