"""An INT8 bundle: a checked FP32 bundle's model quantized, with its own detector and the evidence
of how far its answers are from the FP32 model's.

An INT8 model cannot promise `learn.predict`'s probabilities, so it carries a contract instead,
measured on the validation split (photos neither the model nor the calibration ever saw) and
written in its manifest: top-1 agreement with the FP32 model of at least `MIN_AGREEMENT`, accuracy
at most `MAX_ACCURACY_DROP` below it. A model that misses it is not written unless forced, and a
forced one says so in its manifest and in `/model`.

Calibration photos come from the training split only, through the server's own decoding and
preprocessing. The unfamiliar-image detector is fitted again on the INT8 model's own features
(references: the training split; thresholds: the validation split, as `app.train` does), since
quantization moves the features it compares.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.building.bundle import compile_bundle
from app.building.datasets import class_files, require_classes, split
from app.building.imagenet_test import with_imagenet_test
from app.building.linear_head import FOLDS, stratified_folds
from app.building.measure import Outputs, predict_files
from app.building.quantize import DEFAULT_RECIPE, Recipe, batched, quantize
from app.core.bundle import (
    BUNDLE_FILES,
    BUNDLE_FORMAT,
    DETECTOR_NAME,
    MODEL_NAME,
    BundleManifest,
    LoadedBundle,
    load_bundle,
    write_manifest,
)
from app.core.compiled import installed_versions
from app.core.detector import DEFAULT_KEEP, Detector
from app.core.files import sha256_file
from app.core.images import ImageError
from app.core.prediction import prepare_image
from app.core.runner import ACTIVATIONS, Predictor, inference, onnx_runner

MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005
# ONNX Runtime keeps every calibration photo's activations until the end: about 7 MB a photo for
# EfficientNet-Lite0 (600: 4.4 GB at peak). How 600 was chosen: README, "INT8 bundles".
CALIBRATION_PHOTOS = 600


class ContractNotMet(ValueError):
    """The INT8 model's answers are too far from the FP32 model's to be served in its place."""


def calibration_sample(train_files: list[Path], count: int) -> list[Path]:
    """`count` training photos spread evenly over the (sorted, so class by class) list."""
    if len(train_files) <= count:
        return list(train_files)
    picks = np.linspace(0, len(train_files) - 1, count).round().astype(int)
    return [train_files[i] for i in picks]


def _inputs(files: list[Path], predictor: Predictor):
    for path in files:
        try:
            yield prepare_image(path.read_bytes(), predictor)
        except (ImageError, OSError):
            continue  # never trained on either: app.train verified the photos it used


def _rounded(rates: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in rates.items()}


def agreement(fp32: Outputs, int8: Outputs, targets: np.ndarray, vocab: list[str]) -> dict[str, Any]:
    """INT8 against FP32 on the same photos: top-1 agreement, accuracy of both, the detector's
    flagged rate of both per actual class, and how much the probabilities moved."""
    if fp32.files != int8.files:
        raise ValueError("both models must be measured on the same photos")
    change = np.abs(int8.probs - fp32.probs)
    report: dict[str, Any] = {
        "photos": len(targets),
        "top1_agreement": round(float((int8.probs.argmax(1) == fp32.probs.argmax(1)).mean()), 4),
        "accuracy": {name: round(float((out.probs.argmax(1) == targets).mean()), 4)
                     for name, out in (("fp32", fp32), ("int8", int8))},
        "max_probability_change": round(float(change.max()), 4),
        "mean_probability_change": round(float(change.mean()), 5),
        "flagged_rate": None,
    }
    if fp32.unfamiliar is not None and int8.unfamiliar is not None:
        report["flagged_rate"] = {
            name: _rounded({cls: float(flags[targets == i].mean()) for i, cls in enumerate(vocab)
                            if (targets == i).any()})
            for name, flags in (("fp32", fp32.unfamiliar), ("int8", int8.unfamiliar))}
    return report


def contract_breaches(figures: dict[str, Any]) -> list[str]:
    """What the INT8 model misses of its contract, in words; empty when it meets it."""
    breaches = []
    if figures["top1_agreement"] < MIN_AGREEMENT:
        breaches.append(f"top-1 agreement with FP32 {figures['top1_agreement']:.1%} (needs {MIN_AGREEMENT:.0%})")
    drop = figures["accuracy"]["fp32"] - figures["accuracy"]["int8"]
    if drop > MAX_ACCURACY_DROP + 1e-9:
        breaches.append(f"accuracy {figures['accuracy']['int8']:.1%} against FP32's {figures['accuracy']['fp32']:.1%} "
                        f"(at most {MAX_ACCURACY_DROP * 100:.1f} points lower)")
    return breaches


def _int8_predictor(fp32: Predictor, model: Path, activation: str, threads: int) -> Predictor:
    return dataclasses.replace(fp32, infer=inference(onnx_runner(model, threads), ACTIVATIONS[activation]),
                               onnx_path=model)


def quantize_bundle(fp32_folder: Path, out: Path, train_files: list[Path], valid_files: list[Path], threads: int,
                    calibration_from: dict[str, Any], recipe: Recipe = DEFAULT_RECIPE, photos: int = CALIBRATION_PHOTOS,
                    keep: float = DEFAULT_KEEP, force: bool = False) -> BundleManifest:
    """Write the INT8 bundle of the FP32 bundle in `fp32_folder` to `out`. `train_files` and
    `valid_files`: the model's own training and validation split (actual class: each photo's folder
    name); `calibration_from` says in the manifest where they come from. `ContractNotMet` (and
    nothing written) when the INT8 model misses its contract, unless `force`."""
    source = load_bundle(fp32_folder, threads)
    manifest = source.manifest
    if manifest.precision != "fp32":
        raise ValueError(f"{fp32_folder} is already a {manifest.precision} bundle: quantize an FP32 one")
    vocab = manifest.classes
    valid_files = [p for p in valid_files if p.parent.name in vocab]
    out.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:  # an unfinished bundle is never taken for a whole one
        (out / name).unlink(missing_ok=True)
    calibration = calibration_sample(train_files, photos)
    quantize(fp32_folder / MODEL_NAME, out / MODEL_NAME, batched(_inputs(calibration, source.predictor)), recipe)
    int8 = _int8_predictor(source.predictor, out / MODEL_NAME, manifest.activation, threads)

    int8_valid = predict_files(int8, None, valid_files)
    detector = _refit_detector(source, int8, train_files, int8_valid, keep)
    if detector is not None:
        assert int8_valid.features is not None
        int8_valid.unfamiliar = detector.unfamiliar(int8_valid.features, int8_valid.probs.argmax(axis=1))
    fp32_valid = predict_files(source.predictor, source.detector, valid_files)
    targets = np.array([vocab.index(p.parent.name) for p in fp32_valid.files])
    figures = agreement(fp32_valid, int8_valid, targets, vocab)
    breaches = contract_breaches(figures)
    figures["on"] = "the validation split: photos neither trained nor calibrated on"
    figures["contract"] = {"min_top1_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP,
                           "met": not breaches, "missed": breaches, "forced": bool(breaches) and force}
    if breaches and not force:
        (out / MODEL_NAME).unlink(missing_ok=True)
        raise ContractNotMet(f"the INT8 model misses its contract on {len(targets)} validation photos: "
                             f"{'; '.join(breaches)}; no bundle written (--force writes it anyway)")

    files = {MODEL_NAME: sha256_file(out / MODEL_NAME)}
    if detector is not None:
        detector.save(out / DETECTOR_NAME)
        files[DETECTOR_NAME] = sha256_file(out / DETECTOR_NAME)
    root = Path(calibration_from.get("data", "."))
    quantization = {
        "recipe": recipe.describe(),
        "calibration": {**calibration_from, "photos": len(calibration),
                        "files": [_relative(p, root) for p in calibration]},
        "detector": f"fitted again on the INT8 model's features: references the training split, thresholds the "
                    f"{detector.thresholds_from}" if detector is not None else None,
    }
    int8_manifest = dataclasses.replace(manifest, precision="int8", quantization=quantization, agreement=figures,
                                        files=files, versions=installed_versions(), format=BUNDLE_FORMAT)
    write_manifest(out, int8_manifest)
    return int8_manifest


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _refit_detector(source: LoadedBundle, int8: Predictor, train_files: list[Path], valid: Outputs,
                    keep: float) -> Detector | None:
    """The detector on the INT8 model's features: references its training-photo features,
    thresholds from `valid`, its outputs on the validation photos."""
    if source.detector is None:
        return None
    train = predict_files(int8, None, train_files)
    assert train.features is not None and valid.features is not None
    folds = predicted = None
    if source.detector.thresholds_from != "validation split":
        # As app.train set the FP32 detector's: the training photos' out-of-fold scores join the
        # validation photos' (their predicted class here: the INT8 model's own answer for them).
        labels = np.array([source.manifest.classes.index(p.parent.name) for p in train.files])
        folds = stratified_folds(labels, FOLDS, seed=42)
        predicted = train.probs.argmax(axis=1)
    refit = Detector.fit(source.manifest.source_sha256, train.features, valid.features, valid.probs.argmax(axis=1),
                         len(source.manifest.classes), source.detector.k, keep, folds, predicted)
    imagenet = source.detector.imagenet
    if imagenet is not None:  # its classifier travels with it: refitted on the INT8 features as the k-NN test
        refit = with_imagenet_test(refit, (imagenet.weight, imagenet.bias), train.features, valid.features,
                                   valid.probs.argmax(axis=1), folds, predicted)
    # The outlier test is kept as it is: app.compile has no photos of no class to refit it on, and
    # the agreement figures measure each class's flagged rate under both precisions, this test included.
    return dataclasses.replace(refit, outlier=source.detector.outlier)


def training_split(data: Path, card: dict[str, Any] | None, vocab: list[str]) -> tuple[list[Path], list[Path], str]:
    """The training and validation photos of `data` as `app.train` split them for this model (the
    seed and share its card records; app.train's defaults without one), and how, in words."""
    classes = require_classes(data)
    if classes != sorted(vocab):
        raise ValueError(f"the classes of {data} ({', '.join(classes)}) are not the model's ({', '.join(vocab)})")
    seed, valid_pct = (card or {}).get("seed", 42), (card or {}).get("valid_pct", 0.2)
    files = class_files(data, classes)
    train, valid = split(files, valid_pct, seed)
    return train, valid, split_description(data, seed, valid_pct)


def split_description(data: Path, seed: int, valid_pct: float) -> str:
    """Where an INT8 bundle's calibration and validation photos come from, in its manifest."""
    return f"app.train's split of {data.name} (seed {seed}, {valid_pct:.0%} held out for validation)"


def compile_int8_bundle(export: Path, out: Path, data: Path, threads: int, recipe: Recipe = DEFAULT_RECIPE,
                        photos: int = CALIBRATION_PHOTOS, force: bool = False, code: Path | None = None,
                        check_files: list[Path] | None = None) -> BundleManifest:
    """`export` compiled and checked against learn.predict (`app.building.bundle`, on `check_files`
    too), then quantized into the bundle `out`, calibrated and measured on `data`'s training and
    validation split."""
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        fp32 = compile_bundle(export, Path(tmp), check_files or [], threads, code)
        train, valid, how = training_split(data, fp32.card, fp32.classes)
        return quantize_bundle(Path(tmp), out, train, valid, threads, {"data": str(data), "split": how}, recipe,
                               photos, force=force)


def agreement_summary(manifest: BundleManifest, out: Path) -> str:
    """What an INT8 bundle's manifest says of its answers, in one line."""
    assert manifest.agreement is not None and manifest.quantization is not None
    figures, contract = manifest.agreement, manifest.agreement["contract"]
    accuracy = figures["accuracy"]
    forced = f"; FORCED, it misses its contract: {'; '.join(contract['missed'])}" if contract["forced"] else ""
    return (f"INT8 bundle written to {out}: calibrated on {manifest.quantization['calibration']['photos']} training "
            f"photos; on {figures['photos']} validation photos, top-1 agreement with FP32 "
            f"{figures['top1_agreement']:.1%}, accuracy {accuracy['int8']:.1%} (FP32 {accuracy['fp32']:.1%}), "
            f"largest probability change {figures['max_probability_change']:.3f}{forced}")
