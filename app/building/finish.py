"""Everything after the training loop: calibration, export, the unfamiliar-image detector, the
validation figures (measured through the server's own decoding and preprocessing), plots, the
model card and the checked bundle."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.building.bundle import compile_bundle
from app.building.calibration import Calibration, calibrate, fold_temperature
from app.building.evidence import warnings_for
from app.building.imagenet_test import SDS, imagenet_classifier, with_imagenet_test
from app.building.linear_head import OutOfFold
from app.building.measure import Outputs, confusion_matrix, folder_rates, predict_files, unfamiliar_files
from app.building.outlier_exposure import fit_outlier_test
from app.building.source_split import read_sources, source_split_figures, sources_of
from app.core.detector import Detector, detector_path
from app.core.files import sha256_file
from app.core.model_file import ModelLoadError
from app.learner.compile import build_predictor
from app.learner.features import with_features

EXPORT_NAME = "export.pkl"
BUNDLE_NAME = "bundle"
INT8_BUNDLE_NAME = "bundle-int8"
CARD_NAME = "model-card.json"
PLOTS = ("confusion-matrix.png", "top-losses.png")


@dataclass
class Finished:
    """What `finish` measured and wrote."""

    vocab: list[str]
    valid: Outputs  # the validation photos, run as the server runs them (after calibration)
    targets: np.ndarray
    calibration: Calibration | None
    detector: Detector | None
    export_path: Path
    unfamiliar: dict[str, Any] | None = None  # flagged rates of --unfamiliar photos, per folder
    negatives: np.ndarray | None = None  # their features, when they trained the detector's outlier test

    @property
    def predicted(self) -> np.ndarray:
        return self.valid.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.targets).mean())

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.targets, self.predicted, len(self.vocab))


def finish(learn: Any, train_files: list[Path], valid_files: list[Path], out: Path, k: int, keep: float,
           unfamiliar: Path | None = None, threads: int | None = None,
           train_outputs: Outputs | None = None, out_of_fold: OutOfFold | None = None,
           outlier_keep: float | None = None,
           imagenet: tuple[np.ndarray, np.ndarray] | None = None) -> Finished:
    """Calibrate, export and fit the unfamiliar-image detector, all through the server's own
    decoding and preprocessing (the torch fallback of `app.learner.compile`), so that the validation
    figures and the detector's reference features are what the server will see. `train_outputs`:
    the training photos' pooled features, when fitting the head has already computed them; with
    `out_of_fold` (the linear head's), the temperature and the detector's thresholds rest on the
    training photos' out-of-fold answers as well as on the validation photos. With
    `outlier_keep`, the photos in `unfamiliar` train the detector's second test (its thresholds
    keeping that share familiar), and their flagged rates are measured out of fold. With `imagenet`
    (the backbone's ImageNet classifier), the detector gets its ImageNet test, keeping `keep`."""
    from scipy.special import softmax

    vocab = [str(v) for v in learn.dls.vocab]
    threads = threads or os.cpu_count() or 1
    has_features = with_features(learn.model) is not None
    predictor = build_predictor(learn, threads, backend="torch", with_features=has_features)
    valid = predict_files(predictor, None, valid_files)
    targets = np.array([vocab.index(p.parent.name) for p in valid.files])
    # log-probabilities are the logits up to a constant per row, which softmax ignores.
    log_probs = np.log(np.maximum(valid.probs.astype(np.float64), np.finfo(np.float32).tiny))
    calibration = None
    if predictor.activation == "softmax" and out_of_fold is not None:
        calibration = calibrate(np.concatenate([log_probs, out_of_fold.logits]),
                                np.concatenate([targets, out_of_fold.targets]),
                                "validation split and out-of-fold training photos")
    elif predictor.activation == "softmax":
        calibration = calibrate(log_probs, targets)
    if calibration is not None and calibration.applied:
        fold_temperature(learn.model, calibration.temperature)
        valid.probs = softmax(log_probs / calibration.temperature, axis=1).astype(np.float32)
    export_path = export(learn, out)
    detector = rates = outlier_negatives = None
    if has_features and valid.features is not None:
        train = train_outputs or predict_files(predictor, None, train_files)
        folds = (out_of_fold.fold, out_of_fold.logits.argmax(axis=1)) if out_of_fold is not None else (None, None)
        valid_predicted = valid.probs.argmax(axis=1)
        detector = Detector.fit(sha256_file(export_path), train.features, valid.features, valid_predicted,
                                len(vocab), k, keep, *folds)
        if imagenet is not None:
            detector = with_imagenet_test(detector, imagenet, train.features, valid.features, valid_predicted, *folds)
        if unfamiliar is not None:
            negatives = predict_files(predictor, None, unfamiliar_files(unfamiliar))
            # The k-NN and ImageNet tests never see the photos of no class: their flags on them are honest.
            negatives.unfamiliar = detector.unfamiliar(negatives.features, negatives.probs.argmax(axis=1))
            if outlier_keep is not None:
                labels = np.array([vocab.index(p.parent.name) for p in train.files])
                fitted = fit_outlier_test(train.features, labels, labels if folds[1] is None else folds[1],
                                          valid.features, valid_predicted, negatives.features,
                                          negatives.probs.argmax(axis=1), len(vocab), outlier_keep, folds=folds[0])
                detector = replace(detector, outlier=fitted.test)
                negatives.unfamiliar |= fitted.negative_flags
                outlier_negatives = negatives.features
            rates = folder_rates(negatives, unfamiliar)
        detector.save(detector_path(export_path))
    else:
        detector_path(export_path).unlink(missing_ok=True)
    return Finished(vocab, valid, targets, calibration, detector, export_path, rates, outlier_negatives)


def export(learn: Any, out: Path) -> Path:
    learn.path = out
    path = out / EXPORT_NAME
    learn.export(path.resolve())
    return path


def save_plots(done: Finished, out: Path, top: int = 9) -> None:
    """The validation confusion matrix and the photos with the highest loss, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    ConfusionMatrixDisplay(done.confusion, display_labels=done.vocab).plot(cmap="Blues", colorbar=False)
    plt.title("validation: actual (rows) vs predicted")
    plt.savefig(out / PLOTS[0], bbox_inches="tight", dpi=100)
    plt.close("all")

    probs = done.valid.probs
    losses = -np.log(np.maximum(probs[np.arange(len(done.targets)), done.targets], 1e-12))
    order = np.argsort(-losses)[:top]
    cols = max(1, int(np.ceil(np.sqrt(len(order)))))
    rows = int(np.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order, strict=False):
        with Image.open(done.valid.files[i]) as im:
            ax.imshow(im.convert("RGB"))
        guess = int(probs[i].argmax())
        ax.set_title(f"{done.vocab[done.targets[i]]} -> {done.vocab[guess]}\n"
                     f"p={probs[i][guess]:.2f} loss={losses[i]:.2f}", fontsize=9)
    fig.suptitle("validation photos with the highest loss (actual -> predicted)")
    fig.savefig(out / PLOTS[1], bbox_inches="tight", dpi=80)
    plt.close("all")


def by_source(done: Finished, train_outputs: Outputs | None, args: argparse.Namespace,
              sources: dict[Path, str]) -> dict[str, Any] | None:
    """The recipe's figures on whole sources left out (`app.building.source_split`), when the data's
    SOURCES.csv (`sources`) names every photo's source and the head is linear (refitting it per
    fold is cheap)."""
    if train_outputs is None or train_outputs.features is None or done.valid.features is None or not args.head_fit:
        return None
    files = [*train_outputs.files, *done.valid.files]
    groups = sources_of(files, sources)
    if groups is None or len(set(groups)) < 2:
        return None
    features = np.concatenate([train_outputs.features, done.valid.features])
    labels = np.array([done.vocab.index(p.parent.name) for p in files])
    imagenet = done.detector.imagenet if done.detector is not None else None
    return source_split_figures(features, labels, files, groups, done.vocab, args.head_fit["C"], args.detector_k,
                                args.detector_keep, args.seed, done.negatives, args.outlier_keep,
                                (imagenet.weight, imagenet.bias) if imagenet is not None else None)


def model_card(done: Finished, learn: Any, args: argparse.Namespace, counts: Counter, train_images: int,
               seconds: float, argv: list[str], source_split: dict[str, Any] | None = None,
               sources: list[str] | None = None) -> dict:
    import fastai
    import torch
    import torchvision

    norm = [t for t in learn.dls.after_batch if type(t).__name__ == "Normalize"]
    stats = None
    if norm:
        stats = {"mean": [round(v, 4) for v in norm[0].mean.flatten().tolist()],
                 "std": [round(v, 4) for v in norm[0].std.flatten().tolist()]}
    detector = None
    if done.detector is not None:
        if done.detector.imagenet is None:
            rule = (f"per predicted class: the split-conformal {1 - args.detector_keep:.0%} quantile of the scores of "
                    f"the photos predicted as that class ({done.detector.thresholds_from}; the overall one for a class "
                    "with fewer than 40); photos of no class never set it")
        else:  # the k-NN test's own thresholds, still in the card, no longer decide
            rule = ("one test on the k-NN and ImageNet tests' scores together: each standardised by the photos that "
                    f"set the thresholds ({done.detector.thresholds_from}; the training photos' ImageNet mass on the "
                    f"other folds' support), added, and per predicted class {SDS:g} standard deviations below the "
                    "mean of the sums of the photos predicted as it (the overall one for a class with fewer than 40); "
                    "photos of no class never set it")
        if done.detector.outlier is not None:
            rule += ("; and a second test, outlier exposure, fitted against the --unfamiliar photos, its thresholds "
                     f"the split-conformal {1 - args.outlier_keep:.0%} quantile of its own scores, set the same way; "
                     "their flagged rates are out of fold")
        detector = {**done.detector.describe(), "threshold_rule": rule,
                    "unfamiliar_photos": done.unfamiliar}
    card = {
        "classes": done.vocab,
        "architecture": args.arch,
        "pretrained": args.pretrained,
        "input_size": args.size,
        "normalization": stats,
        "images_per_class": dict(sorted(counts.items())),
        "train_images": train_images,
        "valid_images": len(done.targets),
        "head": {"kind": args.head, **(args.head_fit or {})},
        "epochs": ({"frozen": args.freeze_epochs, "unfrozen": args.epochs} if args.head == "trained"
                   else None),
        "learning_rate": args.lr if args.head == "trained" else None,
        "label_smoothing": args.label_smoothing if args.head == "trained" else None,
        "seed": args.seed,
        "valid_pct": args.valid_pct,
        "valid_accuracy": round(done.accuracy, 4),  # a random split: photos of the training photos' sources
        "valid_error_rate": round(1 - done.accuracy, 4),
        "confusion_matrix": {"labels": done.vocab, "rows_actual_cols_predicted": done.confusion.tolist()},
        "calibration": done.calibration.describe() if done.calibration is not None else None,
        "detector": detector,
        "source_split": source_split,
        # What `app.evaluate` tells new sources from (SOURCES.csv's `repo` of the training photos).
        "train_sources": sources,
        "training_seconds": round(seconds, 1),
        "versions": {"fastai": fastai.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": sys.version.split()[0]},
        "command": shlex.join(["python", "-m", "app.train", *argv]),
        "export_sha256": sha256_file(done.export_path),
        "export_bytes": done.export_path.stat().st_size,
    }
    card["warnings"] = warnings_for(card)
    return card


def complete(learn: Any, train_files: list[Path], valid_files: list[Path], seconds: float, args: argparse.Namespace,
             counts: Counter, argv: list[str], train_outputs: Outputs | None = None,
             out_of_fold: OutOfFold | None = None) -> tuple[dict[str, Any], str | None]:
    """Everything after the training loop: calibration, export, detector, plots, model card and
    bundle. Returns the card, and why no bundle was made (None when one was)."""
    done = finish(learn, train_files, valid_files, args.out, args.detector_k, args.detector_keep, args.unfamiliar,
                  train_outputs=train_outputs, out_of_fold=out_of_fold,
                  outlier_keep=args.outlier_keep if args.outlier_exposure else None,
                  imagenet=imagenet_classifier(args.arch) if args.imagenet_test else None)
    save_plots(done, args.out)
    sources = read_sources(args.data)
    trained_on = sources_of(train_files, sources)
    card = model_card(done, learn, args, counts, len(train_files), seconds, argv,
                      by_source(done, train_outputs, args, sources), sorted(set(trained_on)) if trained_on else None)
    (args.out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    # The checked bundle, to serve without torch: its parity is measured on the validation photos.
    try:
        compile_bundle(done.export_path, args.out / BUNDLE_NAME, valid_files, os.cpu_count() or 1)
    except ModelLoadError as exc:
        return card, str(exc)
    return card, None
