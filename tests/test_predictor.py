"""The fast predictor gives the learner's own answers: preprocessing, ONNX, cache and fallbacks."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from support import BEARS, NO_BEARS, ROOT, image_bytes, synthetic_image

from app.core.files import sha256_file
from app.core.images import decode_image
from app.core.prediction import ranked
from app.core.preprocess import ResizeStep
from app.core.runner import onnx_cache_path
from app.learner.compile import build_predictor
from app.learner.reproduce import fast_preprocess_from, fastai_preprocess


def test_ranked_sorts_high_to_low_and_keeps_every_class():
    assert ranked(["a", "b", "c"], np.array([0.2, 0.5, 0.3])) == [["b", 0.5], ["c", 0.3], ["a", 0.2]]


@pytest.mark.parametrize("size", [(457, 301), (301, 457), (224, 224), (50, 700), (1200, 90)])
@pytest.mark.parametrize("method", ["crop", "squish", "pad", "rrc"])
def test_resize_step_matches_fastai_exactly(size, method):
    from fastai.vision.all import PILImage, RandomResizedCrop, Resize, ResizeMethod

    img = synthetic_image((120, 80, 40), size=size, seed=size[0])
    if method == "rrc":
        tfm, step = RandomResizedCrop(64, min_scale=0.5), ResizeStep("rrc", (64, 64), Image.BILINEAR, 0.14)
    else:
        fastai_method = {"crop": ResizeMethod.Crop, "squish": ResizeMethod.Squish, "pad": ResizeMethod.Pad}[method]
        tfm = Resize((48, 64), method=fastai_method, pad_mode="zeros")
        step = ResizeStep(method, (64, 48), Image.BILINEAR)
    expected = np.asarray(tfm(PILImage(img), split_idx=1))
    assert np.array_equal(np.asarray(step(img)), expected)


def test_fast_preprocessing_reads_the_learners_transforms(tiny_learner):
    fast, why = fast_preprocess_from(tiny_learner)
    assert fast is not None, why
    assert fast.resize.kind == "rrc" and fast.resize.size == (32, 32)
    img = synthetic_image((10, 200, 90), size=(333, 222))
    assert np.abs(fast(img) - fastai_preprocess(tiny_learner)(img)).max() < 1e-5


def test_predictions_equal_learn_predict(tiny_learner, model_copy):
    predictor = build_predictor(tiny_learner, threads=2)
    assert predictor.backend == "onnx" and predictor.preprocessing == "pillow-numpy"
    for seed, colour in enumerate([(200, 40, 40), (40, 180, 60), (40, 60, 200), (128, 128, 128)]):
        img = synthetic_image(colour, size=(90 + seed * 40, 120), seed=seed)
        probs = predictor.infer(predictor.prepare(img)[None])[0][0]
        expected = tiny_learner.predict(img)[2].numpy()
        assert np.abs(probs - expected).max() < 1e-5


def test_onnx_cache_is_reused_rebuilt_when_corrupt_and_keyed_by_the_export(tiny_learner, model_copy):
    sha = sha256_file(model_copy)
    cache = onnx_cache_path(model_copy, sha)
    assert not cache.exists()
    build_predictor(tiny_learner, threads=1, onnx_path=cache)
    assert cache.exists() and cache.name == f"export.{sha[:16]}.onnx"
    built = cache.stat().st_mtime_ns
    time.sleep(0.01)
    build_predictor(tiny_learner, threads=1, onnx_path=cache)
    assert cache.stat().st_mtime_ns == built  # reused, not rebuilt
    cache.write_bytes(b"half-written garbage")
    predictor = build_predictor(tiny_learner, threads=1, onnx_path=cache)
    assert predictor.backend == "onnx" and cache.stat().st_size > 1000  # rebuilt
    # A different export never uses this cache: its name carries the export's hash.
    assert onnx_cache_path(model_copy, "f" * 64) != cache


def test_torch_backend_and_fastai_preprocessing_fallbacks(tiny_learner, tiny_export, model_copy):
    from fastai.learner import load_learner
    from fastai.vision.all import CropPad

    learn = load_learner(tiny_export, cpu=True)
    learn.dls.valid.after_item.add(CropPad(30))  # a transform the fast path does not reproduce
    predictor = build_predictor(learn, threads=1, backend="torch")
    assert predictor.backend == "torch" and predictor.preprocessing == "fastai"
    img = synthetic_image((200, 40, 40), size=(100, 80))
    probs = predictor.infer(predictor.prepare(img)[None])[0][0]
    assert np.abs(probs - learn.predict(img)[2].numpy()).max() < 1e-5


def test_a_model_whose_onnx_export_differs_is_served_with_torch(tiny_export, model_copy, caplog):
    """Python-side logic is frozen into the graph by tracing; the start-up comparison catches it."""
    import random

    from fastai.learner import load_learner
    from torch import nn

    class PythonRandomness(nn.Module):
        def forward(self, x):
            return x * (1 + 50 * random.random())

    learn = load_learner(tiny_export, cpu=True)
    learn.model = nn.Sequential(PythonRandomness(), learn.model)
    predictor = build_predictor(learn, threads=1)
    assert predictor.backend == "torch"
    assert "ONNX path unusable, serving with torch" in caplog.text
    from app.core.model_file import ModelLoadError

    with pytest.raises(ModelLoadError, match="INFERENCE_BACKEND=onnx"):
        build_predictor(learn, threads=1, backend="onnx")


@pytest.mark.skipif(not BEARS.is_dir(), reason=NO_BEARS)
def test_default_model_fast_path_matches_learn_predict_on_real_photos():
    """Top class identical and probabilities within 1e-3 on 24 real photos, decoded the fast way
    (JPEG draft, Pillow/NumPy preprocessing, ONNX Runtime) versus learn.predict on the full image;
    plus six of them enlarged to 12 MP, where draft decoding really shrinks the image."""
    from fastai.learner import load_learner

    model = ROOT / "models" / "export.pkl"
    learn = load_learner(model, cpu=True)
    predictor = build_predictor(learn, threads=2)
    assert predictor.backend == "onnx" and predictor.preprocessing == "pillow-numpy"
    photos = [p.read_bytes() for cls in ("black", "grizzly", "teddys") for p in sorted((BEARS / cls).iterdir())[:8]]
    rng = np.random.default_rng(0)

    def camera_sized(data: bytes) -> bytes:
        enlarged = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((4000, 3000)), np.float32)
        noisy = enlarged + rng.normal(0, 6, enlarged.shape)  # sensor noise, as a real 12 MP photo has
        return image_bytes(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=92)

    enlarged = [camera_sized(photos[i]) for i in range(0, 24, 4)]
    worst = 0.0
    for data in photos + enlarged:
        fast = predictor.infer(predictor.prepare(decode_image(data, draft_size=predictor.draft_size))[None])[0][0]
        with learn.no_bar():
            _, index, reference = learn.predict(decode_image(data))
        assert int(np.argmax(fast)) == int(index)
        worst = max(worst, float(np.abs(fast - reference.numpy()).max()))
    assert worst < 1e-3, worst
