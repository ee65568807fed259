"""From a model file to a classifier that is serving, on the quickest path that is still safe.

Full path: load the learner (importing torch and fastai), build the fast predictor, check it against
the learner, and record the passing check next to the compiled model (`app.core.compiled`).

Fast path, when such a record matches this export and these library versions: serve the compiled
model at once, and load the learner in the background, where the same check runs again. Either way
the learner is loaded on every start; on the fast path it no longer holds up readiness. Should the
learner ever disagree with the record, its own predictor replaces the compiled one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.core.compiled import CompiledModel, Manifest, cache_dirs, load_compiled, manifest_for, save_manifest
from app.core.detector import load_detector, single_threaded_blas
from app.core.model_file import ModelFile, ModelLoadError
from app.core.runner import Predictor, onnx_cache_path
from app.learner.compile import build_predictor
from app.learner.loading import LoadedModel, load_learner_from
from app.serving.classifier import Classifier, ServedModel
from app.serving.config import Settings
from app.serving.metrics import Metrics
from app.serving.model_source import fetch_model_file

log = logging.getLogger(__name__)
LEARNER_THREAD = "learner-loader"


class LearnerState(enum.Enum):
    LOADED = "loaded"
    LOADING = "loading"  # fast path: loading in the background while the compiled model serves
    FAILED = "failed"  # fast path: it did not load; the compiled model checked against it serves on


@dataclass
class Serving:
    """The running classifier and the state of the learner behind it."""

    classifier: Classifier
    learner: LearnerState
    learner_error: str | None = None  # why the learner failed to load, when it did
    model: LoadedModel | None = None  # the learner, once loaded, kept for the life of the process
    background: asyncio.Task | None = None

    def learner_status(self) -> str:
        """What `/model` says: loaded, loading, or failed: <reason>."""
        if self.learner is LearnerState.FAILED:
            return f"failed: {self.learner_error}"
        return self.learner.value

    async def stop(self) -> None:
        if self.background is not None:
            self.background.cancel()
        await asyncio.to_thread(self.classifier.stop)


async def start_serving(settings: Settings, metrics: Metrics, fast_start: bool = True) -> Serving:
    """A started classifier for the configured model; `ModelLoadError` if it cannot be served."""
    file = await fetch_model_file(settings.model_path, settings.model_url, settings.model_sha256)
    detector = await asyncio.to_thread(load_detector, file)
    with_features = detector is not None
    if with_features:
        single_threaded_blas()
    folders = await asyncio.to_thread(cache_dirs, file.path, settings.cache_dir)
    compiled = None
    if fast_start and settings.backend != "torch":
        compiled = await asyncio.to_thread(load_compiled, file, folders.lookup, settings.threads, with_features)
    if compiled is None:
        if folders.fallback_note and settings.backend != "torch":
            log.warning("%s", folders.fallback_note)
        model = await asyncio.to_thread(load_learner_from, file)
        predictor = await asyncio.to_thread(checked_predictor, model, settings, with_features, folders.write)
        served = ServedModel(file, model.vocab, predictor, detector)
        serving = Serving(Classifier(served, settings, metrics), LearnerState.LOADED, model=model)
    else:
        served = ServedModel(file, compiled.vocab, compiled.predictor, detector)
        serving = Serving(Classifier(served, settings, metrics), LearnerState.LOADING)
        serving.background = asyncio.create_task(
            _load_learner_behind(serving, compiled, settings, with_features))
    serving.classifier.start()
    return serving


def _predictor_for(model: LoadedModel, settings: Settings, with_features: bool, cache_dir: Path | None) -> Predictor:
    file = model.file
    return build_predictor(model.learn, settings.threads, settings.backend, with_features,
                           onnx_cache_path(file.path, file.sha256, with_features, cache_dir))


def checked_predictor(model: LoadedModel, settings: Settings, with_features: bool,
                      cache_dir: Path | None) -> Predictor:
    """The fast predictor, checked against the learner, with the check recorded for later starts."""
    predictor = _predictor_for(model, settings, with_features, cache_dir)
    manifest = manifest_for(model.file, predictor, model.vocab, with_features)
    if manifest is not None and predictor.onnx_path is not None:
        save_manifest(predictor.onnx_path, manifest)
    return predictor


def still_loading_a_learner() -> bool:
    """Whether a background learner load is still running: an import of torch cannot be
    interrupted, so a shutdown that does not want to wait for it must exit without joining it."""
    return any(t.name.startswith(LEARNER_THREAD) and t.is_alive() for t in threading.enumerate())


def _recheck(file: ModelFile, settings: Settings, with_features: bool,
             cache_dir: Path | None) -> tuple[LoadedModel, Predictor, Manifest | None]:
    """The learner, its own predictor (self-checked) and that predictor's manifest: all blocking
    work (unpickling, the self-check, hashing the ONNX file), for the background thread."""
    model = load_learner_from(file)
    predictor = _predictor_for(model, settings, with_features, cache_dir)
    return model, predictor, manifest_for(file, predictor, model.vocab, with_features)


async def _load_learner_behind(serving: Serving, compiled: CompiledModel, settings: Settings,
                               with_features: bool) -> None:
    file = serving.classifier.model.file
    # Its own thread, not the event loop's default executor, which asyncio joins on the way out.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LEARNER_THREAD)
    loop = asyncio.get_running_loop()
    try:
        # The same folder as the compiled model being served, so that the check reuses its file.
        cache_dir = compiled.predictor.onnx_path.parent if compiled.predictor.onnx_path else None
        model, predictor, fresh = await loop.run_in_executor(pool, _recheck, file, settings, with_features,
                                                             cache_dir)
    except Exception as exc:  # noqa: BLE001 - reported, and the checked compiled model keeps serving
        reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        serving.learner, serving.learner_error = LearnerState.FAILED, reason
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
    serving.learner = LearnerState.LOADED
