"""Checked model bundles: `python -m app.compile`, the bundle `app.train` writes, a bundle served
where torch and fastai cannot be imported, and every kind of untrustworthy bundle refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import (
    BEARS,
    HEAVY,
    NO_BEARS,
    ROOT,
    AppProcess,
    can_mount_read_only,
    image_bytes,
    make_dataset,
    synthetic_image,
)

from app.core.bundle import DETECTOR_NAME, MANIFEST_NAME, MODEL_NAME, load_bundle
from app.core.detector import Detector
from app.core.files import sha256_file
from app.core.model_file import ModelLoadError

# What the slim image leaves out (see deploy/install-serving.sh): packages the onnxruntime wheel requires but
# only its model-conversion tools import, and shared libraries no serving code path loads.
NOT_IN_THE_SLIM_IMAGE = ("google", "flatbuffers", "numpy.f2py")
LIBRARIES_NOT_IN_THE_SLIM_IMAGE = ("libonnxruntime.so", "_imagingft", "libfreetype", "libharfbuzz", "libpng16",
                                   "libbrotli")
NOT_BEARS = ROOT.parent / "shared" / "data" / "not-bears"


def compile_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.compile", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def bundle(tiny_export: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle `app.train` wrote next to the tiny export."""
    return Path(shutil.copytree(tiny_export.parent / "bundle", tmp_path / "bundle"))


def test_training_writes_a_bundle_bound_to_its_export(tiny_export):
    folder = tiny_export.parent / "bundle"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source"] == {"file": "export.pkl", "sha256": sha256_file(tiny_export)}
    assert manifest["classes"] == ["blues", "greens", "reds"] and manifest["outputs"] == ["logits", "features"]
    assert set(manifest["files"]) == {MODEL_NAME, DETECTOR_NAME}
    assert manifest["parity"]["photos"] == 6  # the validation photos
    assert manifest["parity"]["max_abs_diff"] < 1e-4 and manifest["parity"]["top_class_disagreements"] == 0
    assert manifest["versions"]["onnxruntime"] and manifest["card"]["classes"] == manifest["classes"]


def test_compile_checks_parity_on_every_photo_of_a_folder(tiny_export, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    synthetic_image((90, 90, 90), size=(500, 300)).save(data / "reds" / "wide.png")
    result = compile_cli(str(tiny_export), "--out", str(tmp_path / "b"), "--check", str(data))
    assert result.returncode == 0, result.stderr
    parity = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())["parity"]
    assert parity["photos"] == 10 and parity["generated_images"] >= 4 and parity["max_abs_diff"] < 1e-4
    assert f"MODEL_PATH={tmp_path / 'b'}" in result.stdout


def test_a_bundle_is_served_where_torch_and_fastai_cannot_be_imported(bundle, tiny_learner, tmp_path):
    app = AppProcess({"MODEL_PATH": str(bundle)}, tmp_path / "server.log", without=HEAVY + NOT_IN_THE_SLIM_IMAGE)
    try:
        app.wait_ready(learner=False)
        for seed, colour in enumerate([(200, 40, 40), (40, 180, 60), (40, 60, 200)]):
            img = synthetic_image(colour, size=(90 + 30 * seed, 70), seed=seed)
            answer = requests.post(app.url + "/upload", files={"file": ("p.png", image_bytes(img, "PNG"))},
                                   timeout=30).json()
            with tiny_learner.no_bar():
                expected = dict(zip(tiny_learner.dls.vocab, tiny_learner.predict(img)[2].tolist(), strict=True))
            assert max(abs(p - expected[label]) for label, p in answer["predictions"]) < 1e-5
            assert isinstance(answer["unfamiliar"], bool)
        info = requests.get(app.url + "/model", timeout=10).json()
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        assert info["learner"] == "not used" and info["backend"] == "onnx"
        assert info["sha256"] == manifest["source"]["sha256"] and info["bundle"]["parity"] == manifest["parity"]
        assert info["detector"]["method"] == "knn-cosine" and info["classes"] == manifest["classes"]
        assert "model_info" in requests.get(app.url + "/metrics", timeout=10).text
        assert "/upload" in requests.get(app.url + "/openapi.json", timeout=10).json()["paths"]
        assert "a checked bundle, no learner" in app.log()
        loaded = Path(f"/proc/{app.proc.pid}/maps").read_text()
        assert [lib for lib in LIBRARIES_NOT_IN_THE_SLIM_IMAGE if lib in loaded] == []
        assert "onnxruntime_pybind11_state" in loaded  # the maps are the serving process's own
    finally:
        assert app.stop() == 0


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def other_models_detector(folder: Path) -> None:
    """A detector made for another export, with the manifest updated to match it byte for byte:
    only the binding to the source export is wrong."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    detector = Detector.load(folder / DETECTOR_NAME, manifest["source"]["sha256"])
    Detector(**{**detector.__dict__, "export_sha256": "f" * 64}).save(folder / DETECTOR_NAME)
    edit_manifest(folder, files={**manifest["files"], DETECTOR_NAME: sha256_file(folder / DETECTOR_NAME)})


@pytest.mark.parametrize("breakage,message", [
    (lambda b: edit_manifest(b, format=99), "is of format 99, this server reads formats 1 and 2"),
    (lambda b: (b / MODEL_NAME).write_bytes((b / MODEL_NAME).read_bytes() + b"\0"),
     "model.onnx changed since the bundle was made"),
    (lambda b: (b / DETECTOR_NAME).unlink(), "is missing detector.npz: copy the whole bundle folder"),
    (other_models_detector, "detector.npz was made for another export"),
    (lambda b: edit_manifest(b, classes=["a", "b", "c", "d"]), "outputs 3 classes, its manifest lists 4"),
    (lambda b: (b / MANIFEST_NAME).write_text("{not json"), "manifest.json is unreadable"),
], ids=["other format", "changed file", "missing file", "another model's detector", "classes", "unreadable"])
def test_a_bundle_that_cannot_be_trusted_is_never_served(bundle, breakage, message):
    breakage(bundle)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_bundle(bundle, threads=1)
    assert "\n" not in str(err.value)
    assert "python -m app.compile" in str(err.value) or "copy the whole bundle folder" in str(err.value)


def test_the_server_refuses_an_untrusted_bundle_with_one_line(bundle):
    from support import run_app_until_exit

    (bundle / MODEL_NAME).write_bytes(b"not the compiled model")
    result = run_app_until_exit({"MODEL_PATH": str(bundle)})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot serve the model" in line]
    assert len(lines) == 1 and "model.onnx changed since the bundle was made" in lines[0]


@pytest.mark.parametrize("setup,message", [
    ("not an export", "is not a fastai export (not a torch pickle)"),
    ("truncated export", "is truncated or corrupt"),
    ("missing export", "export not found"),
    ("out is a file", "is a file, not a folder"),
    ("out holds other files", "holds other files"),
    ("missing check folder", "--check folder not found"),
])
def test_compile_exits_2_with_one_line_on_bad_input(tiny_export, tmp_path, setup, message):
    export, out = tiny_export, tmp_path / "out"
    args = []
    if setup == "not an export":
        export = tmp_path / "notes.pkl"
        export.write_text("my notes")
    elif setup == "truncated export":
        export = tmp_path / "export.pkl"
        export.write_bytes(tiny_export.read_bytes()[:5000])
    elif setup == "missing export":
        export = tmp_path / "nope.pkl"
    elif setup == "out is a file":
        out.write_text("x")
    elif setup == "out holds other files":
        out.mkdir()
        (out / "holiday.jpg").write_bytes(b"x")
    elif setup == "missing check folder":
        args = ["--check", str(tmp_path / "nope")]
    result = compile_cli(str(export), "--out", str(out), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.skipif(not can_mount_read_only(), reason="needs a private mount (root in CI)")
def test_compile_with_no_room_to_write_is_one_line(tiny_export, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    command = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"', str(full),
               sys.executable, "-m", "app.compile", str(tiny_export), "--out", str(full / "b")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: cannot write the bundle to {full / 'b'}: No space left on device"


@pytest.mark.skipif(not BEARS.is_dir(), reason=NO_BEARS)
def test_the_default_models_bundle_answers_exactly_as_the_export_is_served(tmp_path):
    """On the validation split and on every photo of no bear: the same probabilities and the same
    `unfamiliar` flags from the bundle (the slim image's path) as from the export (the default)."""
    from app.building.bundle import compile_bundle
    from app.building.datasets import find_classes, image_files, split
    from app.building.evaluate import load_model
    from app.core.prediction import infer_batch, prepare_image

    export = ROOT / "models" / "export.pkl"
    compile_bundle(export, tmp_path / "bundle", [], threads=2)
    slim = load_bundle(tmp_path / "bundle", threads=2)
    predictor, detector, _ = load_model(export, threads=2)
    _, valid = split([f for cls in find_classes(BEARS) for f in image_files(BEARS / cls)], 0.2, 42)
    photos = valid + image_files(NOT_BEARS, recursive=True)
    assert len(photos) > 600
    worst, flags_differ = 0.0, 0
    for start in range(0, len(photos), 32):
        data = [p.read_bytes() for p in photos[start:start + 32]]
        ours = infer_batch(slim.predictor, slim.detector, np.stack([prepare_image(d, slim.predictor) for d in data]))
        theirs = infer_batch(predictor, detector, np.stack([prepare_image(d, predictor) for d in data]))
        worst = max(worst, max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(ours, theirs, strict=True)))
        flags_differ += sum(a.unfamiliar != b.unfamiliar for a, b in zip(ours, theirs, strict=True))
    assert worst < 1e-6 and flags_differ == 0


def test_the_serving_requirements_alone_serve_a_bundle(bundle, tmp_path):
    """What the slim image installs (requirements-serve.txt) in a fresh virtual environment: no
    torch, no fastai, and a bundle is served from it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements-serve.txt")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               check=True).stdout.lower()
    assert "onnxruntime==" in installed and not any(f"\n{name}==" in installed for name in HEAVY)
    app = AppProcess({"MODEL_PATH": str(bundle)}, tmp_path / "server.log", python=python)
    try:
        app.wait_ready(learner=False)
        photo = image_bytes(synthetic_image((40, 60, 200), size=(80, 60)))
        answer = requests.post(app.url + "/upload", files={"file": ("p.jpg", photo)}, timeout=30).json()
        assert answer["predictions"][0][0] == "blues" and "unfamiliar" in answer
    finally:
        assert app.stop() == 0
