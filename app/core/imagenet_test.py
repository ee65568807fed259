"""The detector's ImageNet test: does the backbone's own ImageNet classifier see in a photo the kind
of thing it saw in the training photos?

On a student's few dozen photos a class, the k-NN test's thresholds rest on the lowest of a few
dozen scores, and a look-alike (a bear, to a cats/dogs model) is near enough to some training photo
to pass. ImageNet's 1000 classes stand in for the photos of no class the student did not collect:
EfficientNet-Lite's last layer, applied to the pooled features' average-pooled half (exactly its
input when the body is frozen, as under `app.train`'s linear head), gives ImageNet probabilities;
the test's *support* is the ImageNet classes among the top 10 of any training photo, and a photo's
score is the probability mass on them. A bear puts its mass on ImageNet's bears, not on its cats
and dogs.

The test is joined with the k-NN test into one score (detector format 6): each test's score is
standardised by the photos that set the thresholds (the validation and out-of-fold training photos;
the mass as its logit, since the mass itself piles up near 1), the two are added, and a photo is
unfamiliar below its predicted class's threshold on the sum. Two separate tests, each at the lowest
of a few dozen scores, flag about twice what one does; one threshold on the sum flags fewer
familiar photos and more strangers (README, "A student's small dataset"). A format-5 file's test
stands alone: its thresholds are on the mass, OR'd with the k-NN test's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TOP = 10  # a training photo's top-10 ImageNet classes join the support (`python -m bench.imagenet_test`)
METHOD = ("ImageNet support: the probability mass the backbone's ImageNet classifier puts on the training "
          "photos' top-10 classes, standardised (as a logit) and added to the k-NN test's standardised score")
# The logit of a mass of exactly 0 or 1 (float32 rounds there) would be infinite.
MASS_LIMIT = 1e-6


def imagenet_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The ImageNet classifier on the average-pooled half of fastai's concat-pooled features (its
    max-pooled half comes first)."""
    features = np.asarray(features, np.float32)
    return features[:, features.shape[1] // 2:] @ weight.T + bias


def probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def support_of(probs: np.ndarray, top: int = TOP) -> np.ndarray:
    """The ImageNet classes among the `top` most probable of any of these photos, sorted."""
    return np.unique(np.argsort(-probs, axis=1)[:, :top])


def support_mass(probs: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Each photo's probability mass on the support classes: higher is more familiar."""
    return probs[:, support].sum(axis=1)


def mass_logit(mass: np.ndarray) -> np.ndarray:
    mass = np.clip(np.asarray(mass, np.float32), MASS_LIMIT, 1 - MASS_LIMIT)
    return np.log(mass) - np.log1p(-mass)


@dataclass(frozen=True)
class Scale:
    """How the two tests' scores are standardised before they are added (means and standard
    deviations over the photos that set the thresholds)."""

    knn_mean: float
    knn_std: float
    logit_mean: float
    logit_std: float

    def joint(self, knn_scores: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Higher is more familiar."""
        knn = (np.asarray(knn_scores, np.float32) - np.float32(self.knn_mean)) / np.float32(self.knn_std)
        return knn + (mass_logit(mass) - np.float32(self.logit_mean)) / np.float32(self.logit_std)


@dataclass(frozen=True)
class ImageNetTest:
    """Below its predicted class's threshold of the joint score (of the support mass alone, for a
    format-5 file, which has no `scale`), a photo is unfamiliar."""

    weight: np.ndarray = field(repr=False)  # (1000, d / 2) float32: the ImageNet classifier
    bias: np.ndarray = field(repr=False)  # (1000,)
    support: np.ndarray = field(repr=False)  # the ImageNet class indices of the training photos' top TOP
    class_thresholds: tuple[float, ...]
    method: str = METHOD
    scale: Scale | None = None  # None: a format-5 test, not joined with the k-NN test

    @property
    def joined(self) -> bool:
        return self.scale is not None

    def mass(self, features: np.ndarray) -> np.ndarray:
        return support_mass(probabilities(imagenet_logits(features, self.weight, self.bias)), self.support)

    def scores(self, features: np.ndarray, knn_scores: np.ndarray) -> np.ndarray:
        """Higher is more familiar: the joint score, given the k-NN test's scores of the same photos."""
        mass = self.mass(features)
        return mass if self.scale is None else self.scale.joint(knn_scores, mass)

    def unfamiliar(self, features: np.ndarray, predicted: np.ndarray, knn_scores: np.ndarray) -> np.ndarray:
        limits = np.asarray(self.class_thresholds, np.float32)[np.asarray(predicted)]
        return self.scores(features, knn_scores) < limits

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "support_classes": int(len(self.support)), "joined_with_knn": self.joined,
                "class_thresholds": [round(t, 6) for t in self.class_thresholds]}

    def meta(self) -> dict[str, Any]:
        """What `Detector.save` keeps of it in the file's JSON."""
        scale = None if self.scale is None else asdict(self.scale)
        return {"class_thresholds": self.class_thresholds, "method": self.method, "scale": scale}

    def arrays(self) -> dict[str, np.ndarray]:
        """What `Detector.save` stores of it besides its thresholds (the weight already float16: it
        is fitted with the weights as saved, so serving scores exactly what set the thresholds)."""
        return {"imagenet_weight": self.weight.astype(np.float16), "imagenet_bias": self.bias.astype(np.float32),
                "imagenet_support": self.support.astype(np.int32)}

    @classmethod
    def from_arrays(cls, archive: Any, meta: dict[str, Any]) -> ImageNetTest:
        scale = Scale(**meta["scale"]) if meta.get("scale") else None  # none in format 5
        return cls(archive["imagenet_weight"].astype(np.float32), archive["imagenet_bias"].astype(np.float32),
                   archive["imagenet_support"].astype(np.int64), tuple(meta["class_thresholds"]), meta["method"],
                   scale)
