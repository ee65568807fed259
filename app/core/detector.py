"""Does a photo look like the ones the model was trained on? The unfamiliar-image detector.

A classifier always answers with one of its classes, so a photo of a child, a cat or a cup of
coffee would get "teddys" or "grizzly", often with high confidence. The detector works on the
model's own features (the pooled body features that fastai's head takes as input, from the same
forward pass that gives the logits): a photo is *unfamiliar* when its cosine similarity to its k-th
nearest training image is below the threshold of the class the model predicts for it. Each class's
threshold is set on the validation photos predicted as that class only (and, where `app.train`
has them, the training photos' out-of-fold scores), so that a chosen share of them (97% by
default) are still called familiar: a class whose photos are more varied (teddy bears
in every setting) gets a lower threshold instead of taking most of the false flags.

With `app.train --unfamiliar OTHER --outlier-exposure`, the detector has a second test, learnt
from photos of no class (outlier exposure): a linear score of the same features, fitted to tell the
training photos from those, and a photo is also unfamiliar when it falls below the threshold of its
predicted class on that score. On a student's small set the k-NN test alone lets most look-alikes
through; photos of other things teach it which way "none of these" lies (README, "A student's small
dataset").

Where a student's set is small and there are no photos of no class, `app.train` gives the detector
its ImageNet test instead (`app.core.imagenet_test`): ImageNet's 1000 classes stand in for them,
and the k-NN test's score and the ImageNet test's are judged together, by one threshold on their
standardised sum.

`python -m app.train` fits one for every model it makes and saves it next to the export
(`<export stem>.detector.npz`), bound to the export's sha256: a detector is never paired with
another export. The serving path needs only NumPy here, so the fast restart path keeps working.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.files import write_atomically
from app.core.imagenet_test import ImageNetTest
from app.core.model_file import ModelFile, ModelLoadError

METHOD = "knn-cosine"
FEATURE = "pooled"  # the input of fastai's head: the concatenated average- and max-pooled body output
# 1: one threshold for every class; 2: no `thresholds_from`; 3: no outlier test; 4: no ImageNet test;
# 5: the ImageNet test on its own (all read)
FORMAT = 6
# Compare with the k-th nearest training photo, and keep this share of validation photos familiar:
# how they were chosen is in the README ("Unfamiliar photos") and the model card.
DEFAULT_K = 5
DEFAULT_KEEP = 0.97
# A class with fewer validation photos predicted as it than this gets the overall threshold: below
# about 1 / (1 - keep) photos no quantile of them bounds the rate on new photos.
MIN_CLASS_PHOTOS = 40


class DetectorError(ValueError):
    """A detector file that cannot be used with this export."""


def l2_normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))


def knn_similarity(reference: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity of each query to its k-th most similar row of `reference` (both already
    L2-normalised). One matrix product: well under a millisecond per image for a few thousand rows."""
    sims = queries @ reference.T
    k = min(k, reference.shape[0])
    return np.partition(sims, -k, axis=1)[:, -k]


def out_of_fold_scores(features: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """Each training photo's score against the training photos of the other folds only: what a
    new photo gets against a reference set like the training photos, so that every training photo
    can help set the thresholds. The other folds hold (F-1)/F of the references, so their k-th
    nearest is compared at k (F-1)/F: about as near as the k-th of all of them would be."""
    normed = l2_normalised(features)
    scores = np.empty(len(normed), dtype=np.float32)
    fold_names = np.unique(folds)
    k_in_fold = max(1, round(k * (len(fold_names) - 1) / len(fold_names)))
    for fold in fold_names:
        held = folds == fold
        scores[held] = knn_similarity(normed[~held], normed[held], k_in_fold)
    return scores


def threshold_keeping(scores: np.ndarray, keep: float) -> float:
    """The threshold below which a new score, exchangeable with these, falls with probability at
    most `1 - keep`: the m-th lowest score, m = floor((1 - keep)(n + 1)) (the split-conformal
    quantile; a new score ranks anywhere among the n + 1 with equal chance), and at least the
    lowest. The m - 1 lowest of `scores` fall below it (lower scores are less familiar)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float32))
    m = max(1, int(np.floor((1.0 - keep) * (len(ordered) + 1) + 1e-9)))
    return float(ordered[min(len(ordered), m) - 1])


def per_class(scores: np.ndarray, predicted: np.ndarray, n_classes: int, rule: Callable[[np.ndarray], float],
              fallback: float) -> tuple[float, ...]:
    """For each class, `rule` applied to the scores of the photos predicted as it, or `fallback`
    when fewer than MIN_CLASS_PHOTOS were."""
    return tuple(rule(scores[predicted == c]) if (predicted == c).sum() >= MIN_CLASS_PHOTOS else fallback
                 for c in range(n_classes))


def class_thresholds(scores: np.ndarray, predicted: np.ndarray, n_classes: int, keep: float,
                     fallback: float) -> tuple[float, ...]:
    """For each class, the threshold keeping `keep` of the scores of photos predicted as it, or
    `fallback` when fewer than MIN_CLASS_PHOTOS were."""
    return per_class(scores, predicted, n_classes, lambda values: threshold_keeping(values, keep), fallback)


def class_flag_rates(flagged: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[float, ...]:
    """The share of the photos predicted as each class that are flagged (0 for a class none was)."""
    return tuple(float(flagged[predicted == c].mean()) if (predicted == c).any() else 0.0 for c in range(n_classes))


@dataclass(frozen=True)
class OutlierTest:
    """The detector's second test (outlier exposure): `features @ weight + bias` is higher for photos
    like the training photos than for the photos of no class it was fitted against; below its
    predicted class's threshold, a photo is unfamiliar. The weights have the standardisation of the
    features folded in, so the serving path is one dot product."""

    weight: np.ndarray = field(repr=False)  # (d,) float32
    bias: float
    class_thresholds: tuple[float, ...]
    negatives: int  # photos of no class it was fitted against
    c: float  # the logistic regression's inverse regularisation strength
    method: str = "outlier exposure: logistic regression of the training photos against photos of no class"

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Higher is more like the training photos."""
        return np.asarray(features, np.float32) @ self.weight + np.float32(self.bias)

    def unfamiliar(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return self.scores(features) < np.asarray(self.class_thresholds, np.float32)[np.asarray(predicted)]

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "negatives": self.negatives, "C": self.c,
                "class_thresholds": [round(t, 6) for t in self.class_thresholds]}


@dataclass(frozen=True)
class Detector:
    export_sha256: str
    reference: np.ndarray = field(repr=False)  # L2-normalised features of the training images
    k: int
    threshold: float  # similarity below this: unfamiliar (the overall one; see class_thresholds)
    valid_false_flag_rate: float  # share of the photos that set the thresholds (`thresholds_from`) flagged
    valid_images: int  # how many photos set them
    method: str = METHOD
    feature: str = FEATURE
    # One threshold per class the model predicts (vocab order), and the share of the validation
    # photos predicted as each that it flags; empty: `threshold` for every class (format 1).
    class_thresholds: tuple[float, ...] = ()
    class_false_flag_rates: tuple[float, ...] = ()
    thresholds_from: str = "validation split"
    outlier: OutlierTest | None = None  # the second test, when photos of no class trained one
    imagenet: ImageNetTest | None = None  # the ImageNet test, on a small set with no photos of no class

    @classmethod
    def fit(cls, export_sha256: str, train_features: np.ndarray, valid_features: np.ndarray,
            valid_predicted: np.ndarray, n_classes: int, k: int = DEFAULT_K, keep: float = DEFAULT_KEEP,
            train_folds: np.ndarray | None = None, train_predicted: np.ndarray | None = None) -> Detector:
        """A detector on these training features, each class's threshold set to keep `keep` of the
        validation photos predicted as that class familiar. Validation photos are never in the
        reference set, so their scores are what a new real photo would get. With `train_folds`
        (and each training photo's out-of-fold predicted class), the training photos' scores
        against the other folds join them (`out_of_fold_scores`): thresholds from every photo."""
        reference = l2_normalised(train_features)
        valid_scores = knn_similarity(reference, l2_normalised(valid_features), k)
        if train_folds is not None and train_predicted is not None:
            valid_scores = np.concatenate([valid_scores, out_of_fold_scores(train_features, train_folds, k)])
            valid_predicted = np.concatenate([valid_predicted, train_predicted])
        overall = threshold_keeping(valid_scores, keep)
        thresholds = class_thresholds(valid_scores, valid_predicted, n_classes, keep, overall)
        flagged = valid_scores < np.asarray(thresholds, np.float32)[valid_predicted]
        rates = class_flag_rates(flagged, valid_predicted, n_classes)
        source = "validation split" if train_folds is None else "validation split and out-of-fold training photos"
        return cls(export_sha256, reference, k, overall, float(flagged.mean()), len(valid_scores),
                   class_thresholds=thresholds, class_false_flag_rates=rates, thresholds_from=source)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Higher is more familiar."""
        return knn_similarity(self.reference, l2_normalised(features), self.k)

    def unfamiliar(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """Whether each photo is unlike the training photos, given the class predicted for it: by
        the k-NN test (joined with the ImageNet test where there is one), or by the outlier test."""
        scores = self.scores(features)
        if self.imagenet is not None and self.imagenet.joined:
            flags = self.imagenet.unfamiliar(features, predicted, scores)
        else:
            if self.class_thresholds:
                limits = np.asarray(self.class_thresholds, np.float32)[np.asarray(predicted)]
            else:
                limits = np.float32(self.threshold)
            flags = scores < limits
            if self.imagenet is not None:  # a format-5 file's, on its own
                flags |= self.imagenet.unfamiliar(features, predicted, scores)
        if self.outlier is not None:
            flags |= self.outlier.unfamiliar(features, predicted)
        return flags

    def describe(self) -> dict[str, Any]:
        """What `/model` and the model card say about the detector."""
        info: dict[str, Any] = {
            "method": self.method, "feature": self.feature, "k": self.k, "threshold": round(self.threshold, 6),
            "valid_false_flag_rate": round(self.valid_false_flag_rate, 4), "valid_images": self.valid_images,
            "reference_images": int(self.reference.shape[0]),
            "rule": "per predicted class" if self.class_thresholds else "one for every class",
            "thresholds_from": self.thresholds_from}
        if self.class_thresholds:
            info["class_thresholds"] = [round(t, 6) for t in self.class_thresholds]
            info["class_valid_false_flag_rates"] = [round(r, 4) for r in self.class_false_flag_rates]
        info["outlier_exposure"] = self.outlier.describe() if self.outlier is not None else None
        info["imagenet_test"] = self.imagenet.describe() if self.imagenet is not None else None
        return info

    def save(self, path: Path) -> None:
        meta = {key: getattr(self, key) for key in self.__dataclass_fields__
                if key not in ("reference", "outlier", "imagenet")}
        meta["format"] = FORMAT
        arrays = {}
        if self.outlier is not None:
            meta["outlier"] = {key: value for key, value in asdict(self.outlier).items() if key != "weight"}
            arrays["outlier_weight"] = self.outlier.weight.astype(np.float32)  # small: kept exact
        if self.imagenet is not None:
            meta["imagenet"] = self.imagenet.meta()
            arrays.update(self.imagenet.arrays())
        buffer = io.BytesIO()
        # float16 halves the file; cosine similarities move by ~1e-4, far below the threshold's margin.
        np.savez(buffer, reference=self.reference.astype(np.float16), meta=np.array(json.dumps(meta)), **arrays)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, export_sha256: str) -> Detector:
        """The detector saved at `path`; `DetectorError` if it is unreadable or made for another export."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                reference = archive["reference"].astype(np.float32)
                outlier = meta.pop("outlier", None)
                if outlier is not None:
                    outlier = OutlierTest(weight=archive["outlier_weight"].astype(np.float32),
                                          **{**outlier, "class_thresholds": tuple(outlier["class_thresholds"])})
                imagenet = meta.pop("imagenet", None)
                if imagenet is not None:
                    imagenet = ImageNetTest.from_arrays(archive, imagenet)
            if meta.pop("format") not in (1, 2, 3, 4, 5, FORMAT) or meta.get("method") != METHOD:
                raise DetectorError(f"{path.name} is of another format or method")
            for name in ("class_thresholds", "class_false_flag_rates"):
                meta[name] = tuple(meta.get(name, ()))
            detector = cls(reference=reference, outlier=outlier, imagenet=imagenet, **meta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DetectorError(f"{path.name} is not a readable detector ({exc})") from None
        if detector.export_sha256 != export_sha256:
            raise DetectorError(f"{path.name} was made for another export (sha256 {detector.export_sha256[:12]}, "
                                f"not {export_sha256[:12]})")
        return detector


def single_threaded_blas() -> None:
    """Limit the OpenBLAS that NumPy loaded to one thread, for the life of the process. The
    detector's matrix product (a batch against the training features) is far too small to gain
    from a second thread, and handing work to OpenBLAS threads between ONNX Runtime's batches
    cost 10 ms a batch of 8 (README, Performance). Only OpenBLAS: torch and ONNX Runtime keep
    their own threads."""
    from threadpoolctl import threadpool_info, threadpool_limits

    openblas = {info["prefix"]: 1 for info in threadpool_info() if info["internal_api"] == "openblas"}
    if openblas:
        threadpool_limits(limits=openblas)


def detector_path(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.detector.npz")


def load_detector(file: ModelFile) -> Detector | None:
    """The unfamiliar-image detector saved with this export, None if it has none."""
    path = detector_path(file.path)
    if not path.exists():
        return None
    try:
        return Detector.load(path, file.sha256)
    except DetectorError as exc:
        raise ModelLoadError(f"{exc}: retrain with python -m app.train, or remove it to serve without an "
                             "unfamiliar-image detector") from None
