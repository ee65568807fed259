"""The detector's ImageNet test: does the backbone's own ImageNet classifier see in a photo the kind
of thing it saw in the training photos?

On a student's few dozen photos a class, the k-NN test's thresholds rest on the lowest of a few
dozen scores, and a look-alike (a bear, to a cats/dogs model) is near enough to some training photo
to pass. ImageNet's 1000 classes stand in for the photos of no class the student did not collect:
EfficientNet-Lite's last layer, applied to the pooled features' average-pooled half (exactly its
input when the body is frozen, as under `app.train`'s linear head), gives ImageNet probabilities;
the test's *support* is the ImageNet classes among the top 5 of any training photo, and a photo's
score is the probability mass on them. A bear puts its mass on ImageNet's bears, not on its cats
and dogs. Each predicted class gets a threshold as the k-NN test's do (split-conformal, from the
validation and out-of-fold training photos). Measured in README, "A student's small dataset".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOP = 5  # a training photo's top-5 ImageNet classes join the support: ImageNet's own "top-5"
METHOD = ("ImageNet support: the probability mass the backbone's ImageNet classifier puts on the training "
          "photos' top-5 classes")


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


@dataclass(frozen=True)
class ImageNetTest:
    """Below its predicted class's threshold of support mass, a photo is unfamiliar."""

    weight: np.ndarray = field(repr=False)  # (1000, d / 2) float32: the ImageNet classifier
    bias: np.ndarray = field(repr=False)  # (1000,)
    support: np.ndarray = field(repr=False)  # the ImageNet class indices of the training photos' top 5
    class_thresholds: tuple[float, ...]
    method: str = METHOD

    def scores(self, features: np.ndarray) -> np.ndarray:
        return support_mass(probabilities(imagenet_logits(features, self.weight, self.bias)), self.support)

    def unfamiliar(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return self.scores(features) < np.asarray(self.class_thresholds, np.float32)[np.asarray(predicted)]

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "support_classes": int(len(self.support)),
                "class_thresholds": [round(t, 6) for t in self.class_thresholds]}

    def arrays(self) -> dict[str, np.ndarray]:
        """What `Detector.save` stores of it besides its thresholds (the weight already float16: it
        is fitted with the weights as saved, so serving scores exactly what set the thresholds)."""
        return {"imagenet_weight": self.weight.astype(np.float16), "imagenet_bias": self.bias.astype(np.float32),
                "imagenet_support": self.support.astype(np.int32)}

    @classmethod
    def from_arrays(cls, archive: Any, meta: dict[str, Any]) -> ImageNetTest:
        return cls(archive["imagenet_weight"].astype(np.float32), archive["imagenet_bias"].astype(np.float32),
                   archive["imagenet_support"].astype(np.int64), tuple(meta["class_thresholds"]), meta["method"])
