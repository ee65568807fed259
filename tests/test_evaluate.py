"""`python -m app.evaluate`: a model run the server's way over folders of photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import BEARS, NO_BEARS, ROOT, image_bytes, make_dataset


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def boards(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        yy, xx = np.mgrid[0:48, 0:48]
        board = (((xx // (3 + i)) + (yy // (3 + i))) % 2 * 255).astype(np.uint8)
        (folder / f"{i}.png").write_bytes(_png(board))
    return folder.parent


def _png(board: np.ndarray) -> bytes:
    from PIL import Image

    return image_bytes(Image.fromarray(np.stack([board, 255 - board, board], -1)), "PNG")


def test_evaluate_reports_accuracy_confusion_and_flagged_rates(tiny_export, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    (data / "reds" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    other = boards(tmp_path / "other" / "boards")
    result = evaluate_cli(str(data), "--model", str(tiny_export), "--unfamiliar", str(other),
                          "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes"] == ["blues", "greens", "reds"] and report["images"] == 12
    assert [Path(p).name for p in report["undecodable"]] == ["broken.jpg"]
    matrix = np.array(report["confusion_matrix"]["rows_actual_cols_predicted"])
    assert matrix.sum() == 12 and matrix.sum(axis=1).tolist() == [4, 4, 4]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / 12, abs=1e-4)
    assert report["flagged_unfamiliar"]["per_folder"]["boards"] == {"flagged": 4, "images": 4, "rate": 1.0}
    assert set(report["flagged_known"]["per_class"]) == {"blues", "greens", "reds"}
    assert report["detector"]["method"] == "knn-cosine"
    assert f"accuracy  {report['accuracy']:.2%}" in result.stdout
    assert "boards" in result.stdout and "100.0%" in result.stdout


def test_compare_sets_two_models_side_by_side_and_says_whether_the_new_one_is_as_good(tiny_export, other_export,
                                                                                      tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    other = boards(tmp_path / "other" / "boards")
    result = evaluate_cli(str(data), "--model", str(other_export), "--compare", str(tiny_export),
                          "--unfamiliar", str(other), "--json", str(tmp_path / "c.json"),
                          "--sheet", str(tmp_path / "sheet.png"))
    report = json.loads((tmp_path / "c.json").read_text())
    assert result.returncode == (0 if report["as_good"] else 1), result.stderr
    right = {name: sum(r["actual"] == r["predicted"] for r in report[name]["photos"]) for name in ("new", "old")}
    assert report["right"] == right
    assert report["as_good"] == (right["new"] >= right["old"] and report["flagged_unfamiliar"]["new"]
                                 >= report["flagged_unfamiliar"]["old"])
    old = {r["file"]: (r["predicted"], r["unfamiliar"]) for r in report["old"]["photos"]}
    differ = sorted(r["file"] for r in report["new"]["photos"] if (r["predicted"], r["unfamiliar"]) != old[r["file"]])
    assert sorted(d["file"] for d in report["disagreements"]) == differ
    assert "OLD" in result.stdout and "as good as OLD (NEW is as good as OLD when" in result.stdout
    if differ:
        from PIL import Image

        assert Image.open(tmp_path / "sheet.png").size[0] >= 160

    same = evaluate_cli(str(data), "--model", str(tiny_export), "--compare", str(tiny_export))
    assert same.returncode == 0 and "0 photos answered differently" in same.stdout
    assert "NEW is as good as OLD" in same.stdout


@pytest.mark.parametrize("setup,message", [
    ("missing data", "data folder not found"),
    ("not a class", "are not classes of the model"),
    ("missing model", "not found: pass --model PATH to an export.pkl"),
    ("missing other", "folder of unfamiliar photos not found"),
    ("loose photos", "4 photos lie directly in it: put them in one sub-folder per class"),
    ("data checked before the model", "data folder not found"),
])
def test_bad_input_exits_2_with_one_line(tiny_export, tmp_path, setup, message):
    data = make_dataset(tmp_path / "data", per_class=2)
    args = [str(data), "--model", str(tiny_export)]
    if setup == "missing data":
        args[0] = str(tmp_path / "nope")
    elif setup == "not a class":
        (data / "purples").mkdir()
    elif setup == "missing model":
        args[2] = str(tmp_path / "nope.pkl")
    elif setup == "missing other":
        args += ["--unfamiliar", str(tmp_path / "nope")]
    elif setup == "loose photos":
        args[0] = str(tmp_path / "loose")
        make_dataset(tmp_path / "flat", per_class=2)
        (tmp_path / "loose").mkdir()
        for i, photo in enumerate(sorted((tmp_path / "flat").rglob("*.jpg"))[:4]):
            photo.rename(tmp_path / "loose" / f"{i}.jpg")
    elif setup == "data checked before the model":  # a model that would fail to load is never reached
        args = [str(tmp_path / "nope"), "--model", str(tmp_path / "nope.pkl")]
    result = evaluate_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    assert "MODEL_PATH" not in result.stderr  # evaluate takes --model


@pytest.mark.skipif(not BEARS.is_dir(), reason=NO_BEARS)
def test_default_model_on_its_validation_split_the_way_the_server_runs_it():
    """The model card's figures, measured again through the server's path: accuracy of at least
    98.5% on the 321 held-out photos, and no real bear answered `teddys`."""
    from app.building.datasets import find_classes, image_files, split
    from app.building.evaluate import load_model
    from app.building.measure import predict_files

    predictor, detector, model = load_model(ROOT / "models" / "export.pkl", threads=2)
    files = [f for cls in find_classes(BEARS) for f in image_files(BEARS / cls)]
    _, valid = split(files, 0.2, 42)
    outputs = predict_files(predictor, detector, valid)
    targets = np.array([model.vocab.index(p.parent.name) for p in outputs.files])
    predicted = outputs.probs.argmax(axis=1)
    assert len(targets) == 321
    assert (predicted == targets).mean() >= 0.985
    teddys = model.vocab.index("teddys")
    assert not ((predicted == teddys) & (targets != teddys)).any()
