"""INT8 bundles (`app.building.int8`): made by `app.train --int8` and `app.compile --int8`, from the
same training split, with their agreement contract measured, kept, refused when missed, and served
without torch with what `/model` says about them."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import BEARS, HEAVY, NO_BEARS, ROOT, AppProcess, make_dataset, synthetic_image, unimportable_env

from app.building.int8 import MAX_ACCURACY_DROP, MIN_AGREEMENT, contract_breaches


@pytest.fixture(scope="module")
def int8_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A tiny model trained with `--int8`: (its data, its folder, what app.train printed)."""
    from app.train import main

    root = tmp_path_factory.mktemp("int8")
    data = make_dataset(root / "data", per_class=12)
    other = root / "other" / "greys"  # photos of no class, for the detector's outlier test
    other.mkdir(parents=True)
    for i in range(12):
        synthetic_image((128, 128, 128), seed=50 + i).save(other / f"{i}.jpg")
    out = root / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main([str(data), "--arch", "tiny_cnn", "--no-pretrained", "--epochs", "10", "--freeze-epochs", "0",
                       "--lr", "1e-2", "--size", "32", "--bs", "8", "--workers", "0", "--quiet", "--int8",
                       "--unfamiliar", str(other.parent), "--outlier-exposure", "--out", str(out)])
    assert status == 0, printed.getvalue()
    return data, out, printed.getvalue()


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def compile_int8(export: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.compile", str(export), "--int8", "--calibration", str(data),
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def compile_here(*argv: str) -> subprocess.CompletedProcess:
    """`python -m app.compile ARGV` in this process (torch is imported already: seconds faster)."""
    from app.compile import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return subprocess.CompletedProcess(["app.compile", *argv], status, out.getvalue(), err.getvalue())


def test_train_int8_writes_a_bundle_with_its_contract(int8_trained):
    data, out, printed = int8_trained
    made = manifest(out / "bundle-int8")
    fp32 = manifest(out / "bundle")
    assert made["precision"] == "int8" and fp32["precision"] == "fp32" and made["format"] == 2
    assert made["source"] == fp32["source"] and made["classes"] == fp32["classes"]
    agreement = made["agreement"]
    assert agreement["contract"] == {"min_top1_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP,
                                     "met": True, "missed": [], "forced": False}
    assert agreement["top1_agreement"] >= MIN_AGREEMENT and set(agreement["accuracy"]) == {"fp32", "int8"}
    assert set(agreement["flagged_rate"]["int8"]) == set(made["classes"])
    card = json.loads((out / "model-card.json").read_text())
    assert agreement["photos"] == card["valid_images"]
    calibration = made["quantization"]["calibration"]
    assert calibration["photos"] == len(calibration["files"]) == card["train_images"]  # fewer than 200: all of them
    assert made["quantization"]["recipe"]["format"] == "qoperator"
    assert (out / "bundle-int8" / "model.onnx").stat().st_size < (out / "bundle" / "model.onnx").stat().st_size
    # Its detector is its own: fitted on the INT8 model's features of the same training photos.
    assert made["files"]["detector.npz"] != fp32["files"]["detector.npz"]
    with np.load(out / "bundle-int8" / "detector.npz") as archive, np.load(out / "bundle" / "detector.npz") as fp32:
        assert archive["reference"].shape[0] == card["train_images"]
        # The outlier test has no photos of no class to be refitted on here: it is kept as it is.
        assert np.array_equal(archive["outlier_weight"], fp32["outlier_weight"])
        assert json.loads(str(archive["meta"]))["outlier"] == json.loads(str(fp32["meta"]))["outlier"]
    assert f"INT8 bundle written to {out / 'bundle-int8'}" in printed


def test_compile_int8_calibrates_on_the_split_app_train_made(int8_trained, tmp_path):
    data, out, _ = int8_trained
    done = compile_int8(out / "export.pkl", data, tmp_path / "int8")
    assert done.returncode == 0, done.stderr
    assert "top-1 agreement with FP32" in done.stdout
    made, trained = manifest(tmp_path / "int8"), manifest(out / "bundle-int8")
    assert made["quantization"]["calibration"]["files"] == trained["quantization"]["calibration"]["files"]
    assert made["agreement"]["photos"] == trained["agreement"]["photos"]
    assert "seed 42, 20% held out" in made["quantization"]["calibration"]["split"]


def test_an_int8_bundle_serves_without_torch_and_says_what_it_is(int8_trained, tmp_path):
    from app.core.bundle import load_bundle
    from app.core.prediction import prepare_image

    data, out, _ = int8_trained
    made = manifest(out / "bundle-int8")
    env = unimportable_env(HEAVY)
    app = AppProcess({"MODEL_PATH": str(out / "bundle-int8"), **env}, tmp_path / "server.log").wait_ready()
    fp32 = load_bundle(out / "bundle", threads=1)
    try:
        info = requests.get(app.url + "/model").json()
        assert info["precision"] == "int8" and info["learner"] == "not used"
        assert info["bundle"]["agreement"] == made["agreement"]
        assert info["bundle"]["quantization"]["recipe"] == made["quantization"]["recipe"]
        for path in sorted(data.glob("*/*.jpg"))[::5]:
            body = requests.post(app.url + "/upload", files={"file": (path.name, path.read_bytes())}).json()
            served = np.array([dict(body["predictions"])[c] for c in info["classes"]])
            exact = fp32.predictor.infer(prepare_image(path.read_bytes(), fp32.predictor)[None])[0][0]
            assert np.abs(served - exact).max() <= made["agreement"]["max_probability_change"] + 0.05
            assert isinstance(body["unfamiliar"], bool)
    finally:
        app.stop()


def near_tie_export(export: Path, dest: Path) -> Path:
    """The export with its first two classes' scores made to differ by 0.001 for every photo (the
    last layer's second row a copy of its first, plus 0.001 of bias) and the third class's far
    below: learn.predict then always answers the second class, by a margin far finer than an INT8
    model's resolution, which ties the two and answers the first. A real fastai export."""
    import torch
    from fastai.learner import load_learner

    learn = load_learner(export, cpu=True)
    name, last = [(n, m) for n, m in learn.model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    tied = torch.nn.Linear(last.in_features, last.out_features, bias=True)
    with torch.no_grad():
        tied.weight.copy_(last.weight)
        tied.weight[1] = last.weight[0]
        tied.bias.zero_()
        tied.bias[1] = 1e-3
        tied.bias[2] = -50
    parent = learn.model.get_submodule(name.rpartition(".")[0])
    setattr(parent, name.rpartition(".")[2], tied)
    dest.mkdir(parents=True)
    learn.export(dest / "export.pkl")
    return dest / "export.pkl"


def test_an_int8_model_that_misses_its_contract_is_refused_unless_forced(int8_trained, tmp_path):
    data, out, _ = int8_trained
    export = near_tie_export(out / "export.pkl", tmp_path / "near-tie")
    refused = compile_here(str(export), "--int8", "--calibration", str(data), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2, refused.stdout
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: the INT8 model misses its contract on ") and "--force" in line
    assert "top-1 agreement with FP32 0.0% (needs 99%)" in line
    assert not (tmp_path / "refused" / "manifest.json").exists()
    assert not (tmp_path / "refused" / "model.onnx").exists()

    forced = compile_here(str(export), "--int8", "--calibration", str(data), "--out", str(tmp_path / "forced"),
                          "--force")
    assert forced.returncode == 0, forced.stderr
    assert "FORCED, it misses its contract" in forced.stdout
    contract = manifest(tmp_path / "forced")["agreement"]["contract"]
    assert contract["met"] is False and contract["forced"] is True and contract["missed"]


def test_int8_needs_its_training_data(int8_trained, tmp_path):
    _, out, _ = int8_trained
    done = compile_here(str(out / "export.pkl"), "--int8", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "--int8 needs --calibration DATA" in done.stderr
    other = make_dataset(tmp_path / "other", per_class=3)
    shutil.move(other / "reds", other / "purples")
    done = compile_here(str(out / "export.pkl"), "--int8", "--calibration", str(other), "--out", str(tmp_path / "y"))
    assert done.returncode == 2 and "are not the model's" in done.stderr


@pytest.mark.parametrize(("agreement", "fp32", "int8", "missed"), [
    (0.99, 0.95, 0.945, 0),
    (0.9899, 0.95, 0.95, 1),
    (1.0, 0.95, 0.9449, 1),
    (0.98, 0.95, 0.94, 2),
])
def test_the_contract_is_at_least_99_percent_agreement_and_half_a_point_of_accuracy(agreement, fp32, int8, missed):
    assert len(contract_breaches({"top1_agreement": agreement, "accuracy": {"fp32": fp32, "int8": int8}})) == missed


def test_the_default_models_int8_bundle_is_of_the_default_export_and_meets_its_contract():
    """models/bundle-int8 is committed (it needs the training photos to be made again): it must be
    the default export's, whole, and calibrated on its training split only."""
    from app.building.datasets import image_files, split
    from app.core.bundle import load_bundle
    from app.core.files import sha256_file

    folder = ROOT / "models" / "bundle-int8"
    bundle = load_bundle(folder, threads=1)  # every file's sha256, the detector's export, a probe pass
    made = bundle.manifest
    assert made.precision == "int8" and made.source_sha256 == sha256_file(ROOT / "models" / "export.pkl")
    assert made.agreement is not None and made.agreement["contract"]["met"] is True
    assert made.agreement["contract"]["forced"] is False
    card = json.loads((ROOT / "models" / "model-card.json").read_text())
    assert made.agreement["photos"] == card["valid_images"]
    if not BEARS.is_dir():
        pytest.skip(NO_BEARS)
    files = [p for cls in card["classes"] for p in image_files(BEARS / cls)]
    train, valid = split(files, card["valid_pct"], card["seed"])
    calibration = {BEARS / name for name in made.quantization["calibration"]["files"]}
    assert calibration <= set(train) and not calibration & set(valid)
