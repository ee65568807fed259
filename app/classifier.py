"""Bytes in, ranked class probabilities out: decoding, admission, batching, ranking."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batcher import InferenceWorker, Overloaded
from app.detector import Detector
from app.errors import ApiError
from app.images import decode_image
from app.metrics import Metrics
from app.model_store import ModelFile
from app.predictor import Predictor

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

    def to_json(self, vocab: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"predictions": ranked(vocab, self.probs)}
        if self.unfamiliar is not None:
            body["unfamiliar"] = self.unfamiliar
        return body


def prepare_image(data: bytes, predictor: Predictor, max_pixels: int) -> np.ndarray:
    """Image bytes to model input, exactly as the server does it."""
    return predictor.prepare(decode_image(data, max_pixels, predictor.draft_size))


def infer_batch(predictor: Predictor, detector: Detector | None, batch: np.ndarray) -> list[Outcome]:
    """One forward pass for a batch of prepared images, and the detector on its features."""
    probs, features = predictor.infer(batch)
    if detector is None or features is None:
        return [Outcome(row) for row in probs]
    flags = detector.unfamiliar(features)
    return [Outcome(row, bool(flag)) for row, flag in zip(probs, flags, strict=True)]


class Classifier:
    def __init__(self, file: ModelFile, vocab: list[str], predictor: Predictor, detector: Detector | None, *,
                 threads: int, max_batch: int, queue_size: int, max_pixels: int, metrics: Metrics):
        self.file = file
        self.detector = detector
        self.max_pixels = max_pixels
        self.metrics = metrics
        self.use(predictor, vocab)
        self.worker = InferenceWorker(self._infer, max_batch, queue_size, metrics.observe_batch)
        # Decoding is CPU work too: as many threads as cores, no more, so a burst of 12 MP photos
        # cannot hold dozens of decoded images in memory at once.
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        metrics.in_service.set_function(lambda: self.worker.in_service)

    def use(self, predictor: Predictor, vocab: list[str]) -> None:
        """Serve with this predictor from now on (app.startup may replace the first one)."""
        self.predictor, self.vocab = predictor, vocab
        self.metrics.model.info({"file": self.file.path.name, "sha256": self.file.sha256,
                                 "backend": predictor.backend, "classes": ",".join(vocab)})

    def _infer(self, batch: np.ndarray) -> list[Outcome]:
        return infer_batch(self.predictor, self.detector, batch)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, data: bytes) -> np.ndarray:
        return prepare_image(data, self.predictor, self.max_pixels)

    async def classify(self, read: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
        """Classify the image that `read` returns. Reading (a fetch of up to MAX_UPLOAD_MB) happens
        inside the admission limit, so overload bounds memory as well as queueing."""
        try:
            with self.worker.admission():
                data = await read()
                loop = asyncio.get_running_loop()
                array = await loop.run_in_executor(self._decode_pool, self.prepare, data)
                outcome = await self.worker.predict(array)
        except Overloaded:
            self.metrics.rejected.inc()
            raise ApiError(503, "overloaded", "The server is busy; try again in a moment.",
                           {"Retry-After": "1"}) from None
        return outcome.to_json(self.vocab)
