"""Bytes in, an answer out, under load: admission, decoding on a bounded pool, batching."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.detector import Detector
from app.core.model_file import ModelFile
from app.core.prediction import Outcome, infer_batch, prepare_image
from app.core.runner import Predictor
from app.serving.batcher import InferenceWorker, Overloaded
from app.serving.config import Settings
from app.serving.metrics import Metrics


@dataclass(frozen=True, eq=False)
class ServedModel:
    """What answers requests: the export it came from, its classes, predictor and detector. Two are
    the same only if they are one object (a swap replaces the whole of it)."""

    file: ModelFile
    vocab: list[str]
    predictor: Predictor
    detector: Detector | None


class Classifier:
    def __init__(self, model: ServedModel, settings: Settings, metrics: Metrics):
        self.max_pixels = settings.max_pixels
        self.metrics = metrics
        self.model = model
        self._report_model()
        self.worker = InferenceWorker(self._infer, settings.max_batch, settings.queue_size, metrics.observe_batch)
        # Decoding is CPU work too: as many threads as cores, no more, so a burst of 12 MP photos
        # cannot hold dozens of decoded images in memory at once.
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="decode")
        metrics.in_service.set_function(lambda: self.worker.in_service)

    def use(self, predictor: Predictor, vocab: list[str]) -> None:
        """Serve with this predictor from now on (start-up may replace the first one)."""
        self.swap(dataclasses.replace(self.model, predictor=predictor, vocab=vocab))

    def swap(self, model: ServedModel) -> None:
        """Serve this model from now on: requests already being prepared or queued finish on the
        model they started with, the next ones use this one (one assignment: atomic)."""
        self.model = model
        self._report_model()

    def _report_model(self) -> None:
        model = self.model
        self.metrics.model.info({"file": model.file.path.name, "sha256": model.file.sha256,
                                 "backend": model.predictor.backend, "classes": ",".join(model.vocab)})

    @staticmethod
    def _infer(model: ServedModel, batch: np.ndarray) -> list[Outcome]:
        return infer_batch(model.predictor, model.detector, batch)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, model: ServedModel, data: bytes) -> np.ndarray:
        return prepare_image(data, model.predictor, self.max_pixels)

    async def classify(self, read: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
        """Classify the image that `read` returns. Reading (a fetch of up to MAX_UPLOAD_MB) happens
        inside the admission limit, so overload bounds memory as well as queueing. Raises
        `Overloaded`, `ImageError`, or whatever `read` raises."""
        model = self.model  # this request is answered by the model it started with, even across a swap
        try:
            with self.worker.admission():
                data = await read()
                loop = asyncio.get_running_loop()
                array = await loop.run_in_executor(self._decode_pool, self.prepare, model, data)
                outcome = await self.worker.predict(model, array)
        except Overloaded:
            self.metrics.rejected.inc()
            raise
        return outcome.to_json(model.vocab, model.predictor.threshold)
