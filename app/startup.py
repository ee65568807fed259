"""From a model file to a classifier that is serving, on the quickest path that is still safe.

Full path: load the learner (importing torch and fastai), build the fast predictor, check it against
the learner, and record the passing check next to the compiled model (`app.compiled`).

Fast path, when such a record matches this export and these library versions: serve the compiled
model at once, and load the learner in the background, where the same check runs again. Either way
the learner is loaded on every start; on the fast path it no longer holds up readiness. Should the
learner ever disagree with the record, its own predictor replaces the compiled one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.classifier import Classifier
from app.compiled import CompiledModel, Manifest, cache_dirs, load_compiled, manifest_for, save_manifest
from app.config import Settings
from app.detector import Detector, DetectorError, detector_path, single_threaded_blas
from app.metrics import Metrics
from app.model_store import LoadedModel, ModelFile, ModelLoadError, fetch_model_file, load_learner_from
from app.predictor import Predictor, build_predictor

log = logging.getLogger("app")
LEARNER_THREAD = "learner-loader"


@dataclass
class Serving:
    """The running classifier and the state of the learner behind it."""

    classifier: Classifier
    learner: str  # "loaded", "loading" (fast path, in the background) or "failed: <reason>"
    model: LoadedModel | None = None  # the learner, once loaded, kept for the life of the process
    background: asyncio.Task | None = None

    async def stop(self) -> None:
        if self.background is not None:
            self.background.cancel()
        await asyncio.to_thread(self.classifier.stop)


async def start_serving(settings: Settings, metrics: Metrics, fast_start: bool = True) -> Serving:
    """A started classifier for the configured model; `ModelLoadError` if it cannot be served."""
    file = await fetch_model_file(settings.model_path, settings.model_url, settings.model_sha256)
    detector = await asyncio.to_thread(load_detector, file)
    features = detector is not None
    if features:
        single_threaded_blas()
    folders = await asyncio.to_thread(cache_dirs, file.path, settings.cache_dir)
    compiled = None
    if fast_start and settings.backend != "torch":
        compiled = await asyncio.to_thread(load_compiled, file, folders.lookup, settings.threads, features)
    if compiled is None:
        if folders.fallback_note and settings.backend != "torch":
            log.warning("%s", folders.fallback_note)
        model = await asyncio.to_thread(load_learner_from, file)
        predictor = await asyncio.to_thread(checked_predictor, model, settings, features, folders.write)
        serving = Serving(new_classifier(file, model.vocab, predictor, detector, settings, metrics), "loaded", model)
    else:
        classifier = new_classifier(file, compiled.vocab, compiled.predictor, detector, settings, metrics)
        serving = Serving(classifier, "loading")
        serving.background = asyncio.create_task(_load_learner_behind(serving, file, compiled, settings, features))
    serving.classifier.start()
    return serving


def load_detector(file: ModelFile) -> Detector | None:
    """The unfamiliar-image detector saved with this export, None if it has none."""
    path = detector_path(file.path)
    if not path.exists():
        return None
    try:
        return Detector.load(path, file.sha256)
    except DetectorError as exc:
        raise ModelLoadError(str(exc)) from None


def checked_predictor(model: LoadedModel, settings: Settings, features: bool, cache_dir: Path | None) -> Predictor:
    """The fast predictor, checked against the learner, with the check recorded for later starts."""
    predictor = build_predictor(model.learn, model.file.path, model.file.sha256, settings.threads, settings.backend,
                                features, cache_dir)
    manifest = manifest_for(model.file, predictor, model.vocab, features)
    if manifest is not None and predictor.onnx_path is not None:
        save_manifest(predictor.onnx_path, manifest)
    return predictor


def new_classifier(file: ModelFile, vocab: list[str], predictor: Predictor, detector: Detector | None,
                   settings: Settings, metrics: Metrics) -> Classifier:
    return Classifier(file, vocab, predictor, detector, threads=settings.threads, max_batch=settings.max_batch,
                      queue_size=settings.queue_size, max_pixels=settings.max_pixels, metrics=metrics)


def still_loading_a_learner() -> bool:
    """Whether a background learner load is still running: an import of torch cannot be
    interrupted, so a shutdown that does not want to wait for it must exit without joining it."""
    return any(t.name.startswith(LEARNER_THREAD) and t.is_alive() for t in threading.enumerate())


def _recheck(file: ModelFile, settings: Settings, features: bool,
             cache_dir: Path) -> tuple[LoadedModel, Predictor, Manifest | None]:
    """The learner, its own predictor (self-checked) and that predictor's manifest: all blocking
    work (unpickling, the self-check, hashing the ONNX file), for the background thread."""
    model = load_learner_from(file)
    predictor = build_predictor(model.learn, file.path, file.sha256, settings.threads, settings.backend, features,
                                cache_dir)
    return model, predictor, manifest_for(file, predictor, model.vocab, features)


async def _load_learner_behind(serving: Serving, file: ModelFile, compiled: CompiledModel, settings: Settings,
                               features: bool) -> None:
    # Its own thread, not the event loop's default executor, which asyncio joins on the way out.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LEARNER_THREAD)
    loop = asyncio.get_running_loop()
    try:
        # The same folder as the compiled model being served, so that the check reuses its file.
        cache_dir = compiled.predictor.onnx_path.parent if compiled.predictor.onnx_path else None
        model, predictor, fresh = await loop.run_in_executor(pool, _recheck, file, settings, features, cache_dir)
    except Exception as exc:  # noqa: BLE001 - reported, and the checked compiled model keeps serving
        reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        serving.learner = f"failed: {reason}"
        log.error("the learner failed to load in the background (%s); still serving the compiled model that "
                  "was checked against it on an earlier start", reason)
        return
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    serving.model = model
    if fresh is not None and fresh.serves_like(compiled.manifest):
        log.info("learner loaded in the background; it agrees with the compiled model being served")
    else:
        log.warning("the learner disagrees with the compiled model recorded for it; serving the learner's "
                    "own predictor (%s, %s preprocessing) from now on", predictor.backend, predictor.preprocessing)
        serving.classifier.use(predictor, model.vocab)
        if fresh is not None and predictor.onnx_path is not None:
            await asyncio.to_thread(save_manifest, predictor.onnx_path, fresh)
    serving.learner = "loaded"
