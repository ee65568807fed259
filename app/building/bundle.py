"""Compiling an export into a checked bundle (`app.core.bundle`), with the evidence that it answers
as `learn.predict` does.

Parity is measured image by image: the bundle's answer, computed the server's way from the photo's
bytes (JPEG draft decoding included), against `learn.predict` on the same photo decoded in full
(EXIF orientation applied, as the server sees it). A few generated images are always checked, and
every photo of a folder on request; a bundle whose answers differ by more than `PARITY_TOLERANCE`
is not written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.core.bundle import DETECTOR_NAME, MANIFEST_NAME, MODEL_NAME, BundleManifest, write_manifest
from app.core.compiled import installed_versions
from app.core.detector import detector_path, load_detector
from app.core.files import sha256_file
from app.core.images import ImageError, decode_image
from app.core.model_file import ModelLoadError, open_model_file
from app.core.prediction import prepare_image
from app.core.preprocess import FastPreprocess
from app.core.runner import ACTIVATIONS, Predictor
from app.learner.compile import build_predictor, sample_image
from app.learner.loading import LoadedModel, load_learner_from
from app.learner.reproduce import input_mode

# Largest probability difference from learn.predict a bundle may show (the JPEG draft decoding of
# a 12 MP photo moves probabilities by about 1e-5; README, Performance).
PARITY_TOLERANCE = 1e-3
BATCH = 16


def generated_images() -> list[Image.Image]:
    """Deterministic images of several sizes and shapes, for the parity check of any model."""
    rng = np.random.default_rng(7)
    images = [sample_image()]
    for width, height in ((224, 224), (640, 480), (300, 900)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def _learner_probs(learn: Any, images: list[Image.Image], raw_scores: bool) -> np.ndarray:
    """learn.predict's probabilities for each image (its get_preds on a test set, in batches), each
    image first in the mode fastai opens a photo file in for this learner (grayscale for PILImageBW);
    with `raw_scores`, the softmax of the raw scores it gives (`Predictor.raw_scores`)."""
    mode = input_mode(learn)
    images = [img if img.mode == mode else img.convert(mode) for img in images]
    out = []
    with learn.no_bar():
        for start in range(0, len(images), BATCH):
            dl = learn.dls.test_dl(images[start:start + BATCH], num_workers=0)
            probs = learn.get_preds(dl=dl)[0]
            out.append((probs.softmax(dim=-1) if raw_scores else probs).float().numpy())
    return np.concatenate(out)


def _photos(files: list[Path]) -> Iterator[tuple[bytes, Image.Image]]:
    for path in files:
        try:
            data = path.read_bytes()
            yield data, decode_image(data)
        except (ImageError, OSError):
            continue  # not a photo the server would answer for: nothing to compare


def measure_parity(model: LoadedModel, predictor: Predictor, files: list[Path]) -> dict[str, Any]:
    """The largest difference between the predictor's probabilities and learn.predict's."""
    worst, disagreements, photos = 0.0, 0, 0
    generated = generated_images()
    chunks: list[tuple[list[np.ndarray], list[Image.Image]]] = []
    pending: tuple[list[np.ndarray], list[Image.Image]] = ([], [])

    def add(array: np.ndarray, image: Image.Image) -> None:
        nonlocal pending
        # A batch holds inputs of one shape: a model without a Resize takes each image at its size.
        if pending[0] and (array.shape != pending[0][0].shape or len(pending[0]) == BATCH):
            chunks.append(pending)
            pending = ([], [])
        pending[0].append(array)
        pending[1].append(image)

    for image in generated:
        add(predictor.prepare(image), image)
    for data, image in _photos(files):
        add(prepare_image(data, predictor), image)
        photos += 1
    chunks.append(pending)
    for inputs, images in chunks:
        if not images:
            continue
        ours = predictor.infer(np.stack(inputs))[0]
        theirs = _learner_probs(model.learn, images, predictor.raw_scores)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        disagreements += int((ours.argmax(axis=1) != theirs.argmax(axis=1)).sum())
    reference = "softmax of learn.predict's raw scores" if predictor.raw_scores else "learn.predict"
    return {"reference": reference, "generated_images": len(generated), "photos": photos,
            "max_abs_diff": worst, "top_class_disagreements": disagreements, "tolerance": PARITY_TOLERANCE}


def compile_bundle(export: Path, out: Path, check_files: list[Path], threads: int,
                   code: Path | None = None) -> BundleManifest:
    """Compile `export` into the bundle folder `out` (created; files in it are replaced), checking it
    against the learner on generated images and on `check_files`; `ModelLoadError` if it cannot be.
    `code`: a Python file defining the functions the export refers to (`app.learner.code`)."""
    file = open_model_file(export)
    detector = load_detector(file)
    model = load_learner_from(file, code)
    with_features = detector is not None
    out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_NAME, MODEL_NAME):  # an unfinished bundle is never taken for a whole one
        (out / name).unlink(missing_ok=True)
    predictor = build_predictor(model.learn, threads, "auto", with_features, out / MODEL_NAME, require_file=True)
    if (predictor.backend != "onnx" or not isinstance(predictor.prepare, FastPreprocess)
            or predictor.activation not in ACTIVATIONS):
        raise ModelLoadError(f"{export} cannot be served without torch and fastai (its model, preprocessing or "
                             "activation runs only in them): serve the export itself, MODEL_PATH=export.pkl")
    parity = measure_parity(model, predictor, check_files)
    if parity["max_abs_diff"] > PARITY_TOLERANCE or parity["top_class_disagreements"]:
        raise ModelLoadError(f"the compiled model differs from learn.predict by {parity['max_abs_diff']:.2g} "
                             f"({parity['top_class_disagreements']} different top classes): no bundle written")
    files = {MODEL_NAME: sha256_file(out / MODEL_NAME)}
    if detector is not None:
        shutil.copyfile(detector_path(export), out / DETECTOR_NAME)
        files[DETECTOR_NAME] = sha256_file(out / DETECTOR_NAME)
    else:
        (out / DETECTOR_NAME).unlink(missing_ok=True)
    assert isinstance(predictor.prepare, FastPreprocess)
    manifest = BundleManifest(
        classes=model.vocab, preprocess=predictor.prepare.spec(), activation=predictor.activation,
        outputs=["logits", "features"] if with_features else ["logits"],
        source={"file": export.name, "sha256": file.sha256}, versions=installed_versions(), parity=parity,
        files=files, card=file.card, threshold=predictor.threshold, raw_scores=predictor.raw_scores)
    write_manifest(out, manifest)
    return manifest
