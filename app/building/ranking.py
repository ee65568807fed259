"""Ranking a folder of labelled photos by how likely each one is mislabeled or out of place.

Every photo is judged *out of sample*, by a model that did not see it: features from the pretrained
EfficientNet-Lite0 body of the learner `app.train` would build (offline weights, the server's
preprocessing, the detector's pooled features), then 5-fold cross-validated logistic regression for
out-of-fold class probabilities, whose label quality cleanlab scores (confident learning), plus how
unlike its nearest neighbours each photo is (the unfamiliar-image detector's k-NN similarity), so
that a car in `teddys/` comes up as well as a grizzly in `black/`. Features are cached by file
content (`cache_path`), so a second run is quick.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.building.cli import UsageError, threads_or_all
from app.building.datasets import image_files, require_classes
from app.building.measure import run_over_files
from app.building.recipe import make_dataloaders, new_learner
from app.core.detector import DEFAULT_K, knn_similarity, l2_normalised
from app.core.files import sha256_file, user_cache_dir, write_atomically
from app.core.images import ImageError, decode_image
from app.learner.compile import torch_runner
from app.learner.features import with_features
from app.learner.reproduce import fast_preprocess_from

BACKBONE = "efficientnet_lite0"
SIZE = 224
FOLDS = 5
# A photo whose k-NN similarity lies this many robust standard deviations below the median is
# "out of place"; at OUTLIER_SCALE its outlier part of the score reaches 1.
OUTLIER_Z = 3.0
OUTLIER_SCALE = 4.0


@dataclass(frozen=True)
class Suspect:
    """One photo's place in the review: how likely its label is wrong, and why."""

    file: str  # relative to DATA, with "/"
    label: str
    predicted: str  # the out-of-sample guess
    predicted_prob: float
    label_prob: float  # out-of-fold probability of the folder's label
    label_issue: bool  # cleanlab's confident-learning verdict
    outlier: float  # robust z-score of the k-NN similarity: how far below the data set's typical photo
    score: float  # how suspicious, 0..1: max(1 - label quality, outlier / OUTLIER_SCALE); higher first
    reason: str
    sha256: str

    def row(self) -> dict[str, Any]:
        return {"file": self.file, "label": self.label, "predicted": self.predicted, "score": round(self.score, 4),
                "predicted_prob": round(self.predicted_prob, 4), "label_prob": round(self.label_prob, 4),
                "label_issue": self.label_issue, "outlier": round(self.outlier, 2), "reason": self.reason}


# --- Features ------------------------------------------------------------------------------------


def cache_path() -> Path:
    """Where features are kept between runs: the user's cache folder (DATA may be read-only)."""
    return user_cache_dir() / f"clean-features-{BACKBONE}-{SIZE}.npz"


def load_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return dict(zip(archive["keys"].tolist(), archive["features"], strict=True))
    except (OSError, ValueError, KeyError):
        return {}


def save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(list(cache)), features=np.stack(list(cache.values())).astype(np.float16))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, buffer.getvalue())
    except OSError:
        pass  # no cache: the next run computes the features again


def backbone_features(data: Path, files: list[Path], threads: int) -> tuple[list[Path], list[Path], np.ndarray,
                                                                        list[str]]:
    """Pooled features of the pretrained backbone for each file that decodes (same preprocessing
    as the server's for an EfficientNet-Lite0 learner), from the cache where it has them: the files
    that decoded, those that did not, their features and their sha256s."""
    cache_file = cache_path()
    cache = load_cache(cache_file)
    shas = {path: sha256_file(path) for path in files}
    missing = [p for p in files if shas[p] not in cache]
    failed: list[Path] = []
    if missing:
        computed, failed, found = _compute_features(data, missing, stand_ins(files), threads)
        if computed:
            # float16, as stored: a first run and a cached one then rank exactly alike.
            cache.update({shas[p]: f.astype(np.float16) for p, f in zip(computed, found, strict=True)})
            save_cache(cache_file, cache)
    kept = [p for p in files if shas[p] in cache]
    if not kept:
        raise UsageError("none of the photos could be decoded")
    return kept, failed, np.stack([cache[shas[p]] for p in kept]).astype(np.float32), [shas[p] for p in kept]


def stand_ins(files: list[Path]) -> list[Path]:
    """The first photo of each class folder that decodes, to set the learner up with."""
    found: dict[str, Path] = {}
    for path in files:
        if path.parent.name in found:
            continue
        try:
            decode_image(path.read_bytes())
        except ImageError:
            continue
        found[path.parent.name] = path
    if not found:
        raise UsageError("none of the photos could be decoded")
    return list(found.values())


def _compute_features(data: Path, files: list[Path], set_up_with: list[Path],
                      threads: int) -> tuple[list[Path], list[Path], np.ndarray]:
    import torch

    from app.arch import efficientnet_lite0

    torch.set_num_threads(threads)
    # The learner `app.train` would build on these photos, untrained: its pretrained body, the
    # pooling its head starts with (the detector's features) and its validation preprocessing.
    # fastai sets its DataLoaders up by reading one photo, so they get photos that decode; which
    # ones changes neither the pretrained body nor the preprocessing.
    dls = make_dataloaders(data, set_up_with, SIZE, bs=32, seed=42, valid_pct=0.2, workers=0)
    learn = new_learner(dls, efficientnet_lite0, pretrained=True)
    model = with_features(learn.model)
    prepare, why = fast_preprocess_from(learn)
    if model is None or prepare is None:
        raise RuntimeError(f"the {BACKBONE} learner is not shaped as expected ({why or 'no pooled features'})")
    run = torch_runner(model, threads)
    kept, failed, outputs = run_over_files(
        files, lambda data: prepare(decode_image(data, draft_size=prepare.draft_size)), lambda b: run(b)[1:],
        batch_size=32)
    return kept, failed, outputs[0] if outputs else np.zeros((0, 0), np.float32)


# --- Scores --------------------------------------------------------------------------------------


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = FOLDS,
                              seed: int = 42) -> np.ndarray:
    """Each photo's class probabilities from a logistic regression that did not train on it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = max(2, min(folds, int(np.bincount(labels).min())))
    # C=10: on L2-normalised features a weaker penalty gives probabilities that are not all near
    # uniform, so that "how sure" means something in the ranking.
    model = LogisticRegression(C=10.0, max_iter=5000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, l2_normalised(features), labels, cv=cv, method="predict_proba")


def outlier_z(features: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """How unlike its nearest neighbours each photo is: its similarity to its k-th nearest *other*
    photo (as the unfamiliar-image detector measures it), as a robust z-score below the median
    (median and MAD, so that the outliers themselves do not widen the scale). 0 or less: typical."""
    normalised = l2_normalised(features)
    similarity = knn_similarity(normalised, normalised, k + 1)  # the photo itself is its own nearest
    median = float(np.median(similarity))
    spread = 1.4826 * float(np.median(np.abs(similarity - median))) or 1e-6
    return (median - similarity) / spread


def rank_suspects(data: Path, files: list[Path], features: np.ndarray, shas: list[str],
                  classes: list[str]) -> list[Suspect]:
    """The photos, most suspicious first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.array([classes.index(p.parent.name) for p in files])
    probs = out_of_fold_probabilities(features, labels)
    quality = get_label_quality_scores(labels, probs)
    issues = find_label_issues(labels, probs)
    outlier = outlier_z(features)
    suspects = []
    for i, path in enumerate(files):
        guess = int(probs[i].argmax())
        why = []
        if guess != labels[i]:
            verdict = "likely" if issues[i] else "looks more like"
            why.append(f"{verdict} {classes[guess]} ({probs[i][guess]:.0%} out of sample)")
        if outlier[i] >= OUTLIER_Z:
            why.append("far from every other photo: maybe none of the classes")
        reason = "; ".join(why) or "nothing stands out"
        suspects.append(Suspect(
            file=path.relative_to(data).as_posix(), label=classes[labels[i]], predicted=classes[guess],
            predicted_prob=float(probs[i][guess]), label_prob=float(probs[i][labels[i]]), label_issue=bool(issues[i]),
            outlier=float(outlier[i]), score=float(max(1 - quality[i], np.clip(outlier[i] / OUTLIER_SCALE, 0, 1))),
            reason=reason, sha256=shas[i]))
    return sorted(suspects, key=lambda s: (-s.score, -s.outlier))


@dataclass
class Ranking:
    classes: list[str]
    suspects: list[Suspect]
    undecodable: list[str]  # relative paths of photos that no longer decode


def score_folder(data: Path, threads: int | None = None) -> Ranking:
    """Check DATA and rank every photo in its class folders."""
    classes = require_classes(data)
    files = {cls: image_files(data / cls) for cls in classes}
    empty = [cls for cls, found in files.items() if not found]
    if empty:
        raise UsageError(f"class folders with no images: {', '.join(empty)} (remove them or add photos)")
    kept, failed, features, shas = backbone_features(data, [f for found in files.values() for f in found],
                                                     threads_or_all(threads))
    short = [cls for cls in classes if sum(p.parent.name == cls for p in kept) < 2]
    if short:
        raise UsageError(f"classes with fewer than 2 photos that decode: {', '.join(short)}")
    return Ranking(classes, rank_suspects(data, kept, features, shas, classes),
                   [p.relative_to(data).as_posix() for p in failed])


def write_report(ranking: Ranking, path: Path) -> None:
    fields = ["file", "label", "predicted", "score", "predicted_prob", "label_prob", "label_issue", "outlier",
              "reason"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name in ranking.undecodable:
            writer.writerow({"file": name, "label": name.split("/")[0], "predicted": "", "score": 1.0,
                             "reason": "does not decode"})
        for suspect in ranking.suspects:
            writer.writerow(suspect.row())
