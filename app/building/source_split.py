"""Figures that predict new photos: the model's recipe measured on whole sources it never trained on.

A random validation split draws photos from the same sources as the training photos (the same
image searches, the same photographers), so it says more than a new source will get. Where the
data's `SOURCES.csv` names each photo's source (its `repo` column), `source_split_figures` fits
the linear head again with every source of one fold left out, at the C the real head chose, and
fits the unfamiliar-image detector on the other sources alone (its thresholds from their own
out-of-fold scores), then measures both on the sources left out: accuracy, each class's accuracy
and flagged rate, and every wrong answer with its source. Nothing of the sources left out sets
anything that is reported on them.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from app.building.imagenet_test import with_imagenet_test
from app.building.linear_head import stratified_folds
from app.building.outlier_exposure import KEEP as OUTLIER_KEEP
from app.building.outlier_exposure import fit_outlier_test
from app.core.detector import DEFAULT_K, DEFAULT_KEEP, Detector

SOURCES_FILE = "SOURCES.csv"
FOLDS = 5
INNER_FOLDS = 5


def read_sources(data: Path) -> dict[Path, str]:
    """Each photo's source (the `repo` column of DATA/SOURCES.csv, by its `file` path relative to
    DATA); empty when the data has no such file."""
    table = data / SOURCES_FILE
    if not table.is_file():
        return {}
    with table.open(newline="") as f:
        return {(data / row["file"]).resolve(): row["repo"] for row in csv.DictReader(f) if row.get("repo")}


def sources_of(files: list[Path], sources: dict[Path, str]) -> list[str] | None:
    """The source of every file, or None if any is not listed (figures by source need them all)."""
    found = [sources.get(path.resolve()) for path in files]
    return None if any(s is None for s in found) else [str(s) for s in found]


def _fit_head(features: np.ndarray, labels: np.ndarray, c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=c)).fit(features, labels)


def _fit_detector(features: np.ndarray, folds: np.ndarray, predicted: np.ndarray, n_classes: int, k: int,
                  keep: float, imagenet: tuple[np.ndarray, np.ndarray] | None) -> Detector:
    """The detector on these photos alone (with its ImageNet test, given the classifier),
    thresholds from their out-of-fold scores."""
    detector = Detector.fit("", features, features[:0], predicted[:0], n_classes, k, keep, folds, predicted)
    if imagenet is None:
        return detector
    return with_imagenet_test(detector, imagenet, features, features[:0], predicted[:0], folds, predicted)


def source_split_figures(features: np.ndarray, labels: np.ndarray, files: list[Path], groups: list[str],
                         vocab: list[str], c: float, k: int = DEFAULT_K, keep: float = DEFAULT_KEEP,
                         seed: int = 42, negatives: np.ndarray | None = None,
                         outlier_keep: float = OUTLIER_KEEP,
                         imagenet: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Accuracy and flagged rates of the linear-head recipe on sources left out, by fold. With
    `negatives` (the features of the photos of no class an outlier test learns from), each fold's
    detector gets its outlier test too (keeping `outlier_keep`), fitted on the other sources and
    those photos; with `imagenet` (the backbone's ImageNet classifier), its ImageNet test, fitted on
    the other sources."""
    from sklearn.model_selection import GroupKFold

    names = np.array(groups)
    n_sources = len(set(groups))
    splitter = GroupKFold(min(FOLDS, n_sources))
    predicted = np.zeros(len(labels), dtype=int)
    flagged = np.zeros(len(labels), dtype=bool)
    for train, held in splitter.split(features, labels, names):
        head = _fit_head(features[train], labels[train], c)
        # The detector's own thresholds come from the training sources' out-of-fold answers.
        train_predicted = np.asarray(head.predict(features[train]))
        folds = stratified_folds(labels[train], INNER_FOLDS, seed)
        detector = _fit_detector(features[train], folds, train_predicted, len(vocab), k, keep, imagenet)
        if negatives is not None:
            fitted = fit_outlier_test(features[train], labels[train], train_predicted, features[:0], labels[:0],
                                      negatives, np.asarray(head.predict(negatives)), len(vocab), outlier_keep,
                                      seed)
            detector = replace(detector, outlier=fitted.test)
        predicted[held] = head.predict(features[held])
        flagged[held] = detector.unfamiliar(features[held], predicted[held])
    per_class = {}
    for i, cls in enumerate(vocab):
        mine = labels == i
        per_class[cls] = {"photos": int(mine.sum()), "sources": len(set(names[mine])),
                          "accuracy": round(float((predicted[mine] == i).mean()), 4) if mine.any() else None,
                          "flagged": round(float(flagged[mine].mean()), 4) if mine.any() else None}
    wrong = np.nonzero(predicted != labels)[0]
    outlier = (" (its outlier test with it)" if negatives is not None else
               " (its ImageNet test with it)" if imagenet is not None else "")
    return {
        "method": f"{splitter.n_splits} folds of whole sources (SOURCES.csv `repo`): the linear head refitted at "
                  f"C={c} and the detector{outlier} refitted on the other sources, measured on the sources left out",
        "photos": len(labels), "sources": n_sources,
        "accuracy": round(float((predicted == labels).mean()), 4),
        "flagged": round(float(flagged.mean()), 4),
        "per_class": per_class,
        "errors": [{"file": files[i].name, "actual": vocab[labels[i]], "predicted": vocab[predicted[i]],
                    "source": groups[i]} for i in wrong],
    }


def by_training_source(photos: list[dict[str, Any]], sources: dict[Path, str],
                       train_sources: list[str] | None) -> dict[str, Any]:
    """`app.evaluate`'s per-photo answers split by whether the model trained on photos of their
    source (its card's `train_sources`): accuracy and flagged rate of each part, and on how many
    photos and sources each rests. Photos of no listed source count apart."""
    if train_sources is None:
        return {"known": False, "note": "the model card does not list the sources it trained on (made before they "
                                        "were recorded), so photos of new sources cannot be told apart"}
    seen = set(train_sources)
    parts: dict[str, list[dict[str, Any]]] = {"new sources": [], "sources it trained on": [], "no source listed": []}
    for photo in photos:
        source = sources.get(Path(photo["file"]).resolve())
        parts["no source listed" if source is None else "sources it trained on" if source in seen
              else "new sources"].append({**photo, "source": source})
    report: dict[str, Any] = {"known": True}
    for name, rows in parts.items():
        if not rows:
            continue
        flags = [r["unfamiliar"] for r in rows if r["unfamiliar"] is not None]
        report[name] = {"photos": len(rows), "sources": len({r["source"] for r in rows if r["source"]}),
                        "accuracy": round(sum(r["actual"] == r["predicted"] for r in rows) / len(rows), 4),
                        "flagged": round(sum(flags) / len(flags), 4) if flags else None}
    return report
