"""A student's small cats/dogs set fitted on features as `app.train` fits it, for the benches that
choose the detector's settings with no bear in sight (`bench.outlier_keep`, `bench.imagenet_test`).

N photos a class of `../shared/data/not-bears/{cats,dogs}`, drawn as `bench.small_data` draws them
(with draws that bench does not report), run once through a model's bundle for their pooled
features: the body is frozen under `app.train`'s linear head, so they are `app.train`'s own. Then a
20% validation split, the linear head as a logistic regression, and the k-NN test with out-of-fold
thresholds.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.building.datasets import split
from app.building.linear_head import stratified_folds
from app.building.measure import Outputs, predict_files
from app.core.bundle import load_bundle
from app.core.detector import Detector
from bench.servers import ROOT
from bench.small_data import CLASSES, drawn
from bench.sources import SHARED

VALID_PCT, SEED = 0.2, 42  # app.train's defaults
# app.train picks its head's C by cross-validation (1.0 on one 25-photo set); it matters little here:
# under 40 photos a class both classes share one threshold, and the head gets these sets ~100% right.
HEAD_C = 0.01


@dataclass
class SmallSet:
    """A small cats/dogs set fitted as `app.train` fits it, on features: the split, the head, the
    k-NN test, and the cats and dogs it never saw."""

    train: np.ndarray
    train_labels: np.ndarray
    folds: np.ndarray
    valid: np.ndarray
    head: Any  # scikit-learn pipeline: standardisation and logistic regression
    knn: Detector
    new: np.ndarray
    new_labels: np.ndarray

    def worst_class(self, detector: Detector) -> float:
        """The highest share of a class's new photos `detector` flags."""
        flags = detector.unfamiliar(self.new, self.head.predict(self.new))
        return max(float(flags[self.new_labels == c].mean()) for c in range(len(CLASSES)))

    def flagged(self, detector: Detector, features: np.ndarray) -> float:
        return float(detector.unfamiliar(features, self.head.predict(features)).mean())


def small_set(photos: Outputs, size: int, draw: int) -> SmallSet:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    row = {p: i for i, p in enumerate(photos.files)}
    pools = {c: sorted(p for p in photos.files if p.parent.name == c) for c in CLASSES}
    chosen = {c: sorted(drawn(pool, size, draw)) for c, pool in pools.items()}
    train_files, valid_files = split([p for c in CLASSES for p in chosen[c]], VALID_PCT, SEED)
    new_files = [p for c in CLASSES for p in pools[c] if p not in chosen[c]]

    def features(files: list[Path]) -> np.ndarray:
        return photos.features[[row[p] for p in files]]

    def labels(files: list[Path]) -> np.ndarray:
        return np.array([CLASSES.index(p.parent.name) for p in files])

    train, valid, train_labels = features(train_files), features(valid_files), labels(train_files)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=5000)).fit(train, train_labels)
    folds = stratified_folds(train_labels, 5, SEED)
    knn = Detector.fit("", train, valid, head.predict(valid), len(CLASSES), train_folds=folds,
                       train_predicted=train_labels)
    return SmallSet(train, train_labels, folds, valid, head, knn, features(new_files), labels(new_files))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every such bench takes: whose features, which sizes, which draws."""
    parser.add_argument("--model", type=Path, default=ROOT / "models", help="whose bundle gives the features")
    parser.add_argument("--sizes", type=int, nargs="+", default=[15, 25, 35])
    parser.add_argument("--draws", type=int, nargs="+", default=[2, 3, 4], help="bench.small_data reports 0 and 1")


def not_bears(model: Path) -> tuple[Outputs, str]:
    """Every not-bears photo through the model's FP32 bundle, and the model's architecture."""
    bundle = load_bundle(model / "bundle", os.cpu_count() or 1)
    photos = predict_files(bundle.predictor, None, sorted((SHARED / "not-bears").glob("*/*.jpg")))
    return photos, bundle.manifest.card["architecture"]
