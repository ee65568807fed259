"""A restart serves the compiled model checked on an earlier start, without importing torch or
fastai, and only when nothing about it has changed; the learner still loads, in the background."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import ROOT, AppProcess, image_bytes, synthetic_image

from app.core.compiled import installed_versions, load_compiled, manifest_path
from app.core.files import sha256_file
from app.core.model_file import ModelFile
from app.core.preprocess import FastPreprocess, ResizeStep
from app.core.runner import onnx_cache_path
from app.serving.config import Settings
from app.serving.metrics import Metrics
from app.serving.startup import start_serving


def check_model(model: Path, **env: str) -> None:
    """`python -m app --check`: the full start-up path, which records the compiled model's check."""
    result = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "MODEL_PATH": str(model), **env}, timeout=300)
    assert result.returncode == 0, result.stderr


def model_file(model: Path) -> ModelFile:
    return ModelFile(model, sha256_file(model), None)


# The tiny export comes with an unfamiliar-image detector, so its compiled model has two outputs.
def compiled_path(model: Path) -> Path:
    return onnx_cache_path(model, sha256_file(model), with_features=True)


def record_path(model: Path) -> Path:
    return manifest_path(compiled_path(model))


def load_beside(model: Path):
    return load_compiled(model_file(model), (model.parent,), threads=1, with_features=True)


@pytest.fixture(scope="module")
def checked_once(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checked") / "model"
    shutil.copytree(tiny_export.parent, folder, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.json"))
    check_model(folder / "export.pkl")
    return folder


@pytest.fixture
def checked(checked_once: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny export whose check `python -m app --check` has recorded."""
    shutil.copytree(checked_once, tmp_path / "model")
    return tmp_path / "model" / "export.pkl"


def test_preprocessing_spec_round_trips_through_json():
    step = FastPreprocess(ResizeStep("crop", (64, 48), Image.BILINEAR), 255.0, (0.485, 0.456, 0.406),
                          (0.229, 0.224, 0.225))
    again = FastPreprocess.from_spec(json.loads(json.dumps(step.spec())))
    assert again == step
    img = synthetic_image((90, 120, 200), size=(123, 77))
    assert np.array_equal(again(img), step(img))
    with pytest.raises(ValueError, match="unknown resize kind"):
        FastPreprocess.from_spec({**step.spec(), "kind": "zoom"})


def test_normalisation_is_fastais_float32_arithmetic_exactly():
    mean, std = (0.498, 0.2, 0.7), (0.502, 0.3, 0.1)
    step = FastPreprocess(ResizeStep("squish", (40, 30), Image.BILINEAR), 255.0, mean, std)
    img = synthetic_image((128, 30, 220), size=(40, 30))
    pixels = np.asarray(img, np.float32).transpose(2, 0, 1) / np.float32(255.0)
    expected = (pixels - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    assert np.array_equal(step(img), expected)


def test_a_checked_model_is_served_again_without_importing_torch_or_fastai(checked, tiny_learner):
    model_copy = checked
    assert record_path(model_copy).exists()
    img_path = model_copy.parent / "probe.png"
    synthetic_image((40, 180, 60), size=(70, 50), seed=3).save(img_path)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from PIL import Image
        from app.core.compiled import load_compiled
        from app.core.files import sha256_file
        from app.core.model_file import ModelFile
        model = Path({str(model_copy)!r})
        compiled = load_compiled(ModelFile(model, sha256_file(model), None), (model.parent,), 1, with_features=True)
        p = compiled.predictor
        probs, features = p.infer(p.prepare(Image.open({str(img_path)!r}).convert("RGB"))[None])
        probs = probs[0]
        heavy = sorted(m for m in ("torch", "fastai", "torchvision") if m in sys.modules)
        print(json.dumps({{"vocab": compiled.vocab, "probs": probs.tolist(), "heavy": heavy}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert result["vocab"] == ["blues", "greens", "reds"]
    with tiny_learner.no_bar():
        expected = tiny_learner.predict(Image.open(img_path).convert("RGB"))[2].numpy()
    assert np.abs(np.array(result["probs"]) - expected).max() < 1e-5


def tamper_onnx(model: Path) -> None:
    cache = compiled_path(model)
    cache.write_bytes(cache.read_bytes() + b"\0")


def edit_manifest(**changes):
    def edit(model: Path) -> None:
        path = record_path(model)
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


@pytest.mark.parametrize("change", [
    pytest.param(tamper_onnx, id="onnx file modified"),
    pytest.param(edit_manifest(versions={**installed_versions(), "fastai": "2.7.0"}), id="other fastai version"),
    pytest.param(edit_manifest(format=0), id="older manifest format"),
    pytest.param(edit_manifest(export_sha256="0" * 64), id="written for another export"),
    pytest.param(edit_manifest(activation="relu"), id="unknown activation"),
    pytest.param(lambda model: record_path(model).write_text("{not json"), id="corrupt manifest"),
])
def test_the_record_is_ignored_when_anything_changed(checked, change):
    assert load_beside(checked) is not None
    change(checked)
    assert load_beside(checked) is None


def test_a_changed_export_is_never_served_from_the_old_record(checked):
    with open(checked, "ab") as f:
        f.write(b"\0")  # still loadable (zip readers ignore trailing bytes), but another file
    assert load_beside(checked) is None


def test_restart_is_ready_before_the_learner_loads_and_answers_the_same(model_copy, tmp_path):
    upload = {"file": ("p.jpg", image_bytes(synthetic_image((200, 40, 40), size=(90, 60))), "image/jpeg")}
    first = AppProcess({"MODEL_PATH": str(model_copy)}, tmp_path / "first.log").wait_ready()
    try:
        assert requests.get(first.url + "/model", timeout=5).json()["learner"] == "loaded"
        before = requests.post(first.url + "/upload", files=upload, timeout=30).json()
    finally:
        first.stop()
    assert "learner loading in the background" not in first.log()

    second = AppProcess({"MODEL_PATH": str(model_copy)}, tmp_path / "second.log").wait_ready(learner=False)
    try:
        assert requests.get(second.url + "/model", timeout=5).json()["backend"] == "onnx"
        assert requests.post(second.url + "/upload", files=upload, timeout=30).json() == before
        second.wait_ready()
        assert requests.get(second.url + "/model", timeout=5).json()["learner"] == "loaded"
    finally:
        second.stop()
    log = second.log()
    assert log.index("learner loading in the background") < log.index("it agrees with the compiled model")


def test_sigterm_while_the_learner_loads_exits_at_once(checked, tmp_path):
    """Importing torch in the background cannot be interrupted; shutting down must not wait for it."""
    app = AppProcess({"MODEL_PATH": str(checked)}, tmp_path / "server.log").wait_ready(learner=False)
    assert requests.get(app.url + "/model", timeout=5).json()["learner"] == "loading"
    started = time.monotonic()
    assert app.stop() == 0
    assert time.monotonic() - started < 4, app.log()


def test_a_learner_that_disagrees_with_the_record_replaces_it(checked):
    """A record that passes every identity check but describes other preprocessing (as a bug in an
    older version of this service might have written) is corrected by the background check."""
    model_copy = checked
    path = record_path(model_copy)
    recorded = json.loads(path.read_text())
    edit_manifest(preprocess={**recorded["preprocess"], "mean": [0.9, 0.9, 0.9]})(model_copy)

    async def restart():
        serving = await start_serving(Settings(model_path=model_copy, threads=1), Metrics())
        compiled = serving.classifier.model.predictor
        assert serving.learner_status() == "loading"
        await serving.background
        try:
            return compiled, serving
        finally:
            await serving.stop()

    compiled, serving = asyncio.run(restart())
    assert serving.learner_status() == "loaded"
    assert serving.classifier.model.predictor is not compiled
    assert serving.classifier.model.predictor.prepare.spec()["mean"] == recorded["preprocess"]["mean"]
    assert json.loads(path.read_text())["preprocess"] == recorded["preprocess"]  # the record is rewritten


def test_a_learner_that_no_longer_loads_leaves_the_checked_model_serving(tiny_export, tiny_learner, tmp_path):
    """An export that needs a module the deployment has since lost: the first start (with the
    module) records the check; a restart without it still serves, and says the learner failed."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "bear_helpers.py").write_text("def label(path):\n    return path.parent.name\n")
    model = tmp_path / "model" / "export.pkl"
    model.parent.mkdir()
    script = textwrap.dedent(f"""
        import bear_helpers
        from fastai.learner import load_learner
        learn = load_learner({str(tiny_export)!r}, cpu=True)
        learn.labeller = bear_helpers.label  # pickled by reference: unpickling needs the module
        learn.export({str(model)!r})
    """)
    with_module = {"PYTHONPATH": str(extra)}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, env={**os.environ, **with_module})
    check_model(model, **with_module)

    app = AppProcess({"MODEL_PATH": str(model)}, tmp_path / "server.log").wait_ready()
    try:
        learner = requests.get(app.url + "/model", timeout=5).json()["learner"]
        img = synthetic_image((40, 60, 200))
        upload = {"file": ("p.png", image_bytes(img, "PNG"), "image/png")}
        response = requests.post(app.url + "/upload", files=upload, timeout=30)
    finally:
        app.stop()
    assert learner.startswith("failed: ") and "bear_helpers" in learner
    assert "the learner failed to load in the background" in app.log()
    assert response.status_code == 200
    served = dict(response.json()["predictions"])
    with tiny_learner.no_bar():
        expected = tiny_learner.predict(img)[2].numpy()
    assert max(abs(served[label] - float(p)) for label, p in zip(tiny_learner.dls.vocab, expected, strict=True)) < 1e-5


def test_activations_are_named_only_when_numpy_reproduces_them():
    from types import SimpleNamespace

    from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat

    from app.learner.reproduce import activation

    def named(loss_func) -> str:
        return activation(SimpleNamespace(loss_func=loss_func))[0]

    assert named(CrossEntropyLossFlat()) == "softmax"
    assert named(BCEWithLogitsLossFlat()) == "sigmoid"
    assert named(SimpleNamespace(activation=lambda x: x.softmax(-1) ** 2)) == "custom"  # never recorded
