"""Image bytes to an answer, as pure functions: what serving runs for each request and what
evaluation runs for each photo, so that both measure the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.detector import Detector
from app.core.images import MAX_PIXELS, decode_image
from app.core.runner import Predictor

Predictions = list[list[str | float]]


def ranked(vocab: list[str], probs: np.ndarray) -> Predictions:
    """`[[label, probability], ...]` for every class, highest first (ties keep vocab order)."""
    order = sorted(range(len(vocab)), key=lambda i: -float(probs[i]))
    return [[vocab[i], float(probs[i])] for i in order]


@dataclass(frozen=True)
class Outcome:
    """One image's answer: its class probabilities (vocab order) and, for a model with a detector,
    whether the image looks like none of the training photos."""

    probs: np.ndarray
    unfamiliar: bool | None = None

    def to_json(self, vocab: list[str], threshold: float | None = None) -> dict[str, Any]:
        """The API's answer. With a multi-label `threshold`, also the classes above it (in vocab
        order, as learn.predict decodes them) and the threshold itself."""
        body: dict[str, Any] = {"predictions": ranked(vocab, self.probs)}
        if threshold is not None:
            body["labels"] = [label for label, p in zip(vocab, self.probs, strict=True) if float(p) > threshold]
            body["threshold"] = threshold
        if self.unfamiliar is not None:
            body["unfamiliar"] = self.unfamiliar
        return body


def prepare_image(data: bytes, predictor: Predictor, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes to model input, exactly as the server does it; `ImageError` if they are not."""
    return predictor.prepare(decode_image(data, max_pixels, predictor.draft_size))


def infer_batch(predictor: Predictor, detector: Detector | None, batch: np.ndarray) -> list[Outcome]:
    """One forward pass for a batch of prepared images, and the detector on its features."""
    probs, features = predictor.infer(batch)
    if detector is None or features is None:
        return [Outcome(row) for row in probs]
    flags = detector.unfamiliar(features, probs.argmax(axis=1))
    return [Outcome(row, bool(flag)) for row, flag in zip(probs, flags, strict=True)]
