"""From a model file to a classifier that is serving, on the quickest path that is still safe.

Full path: load the learner, build the fast predictor, check it against the learner, and record the
passing check next to the compiled model (`app.core.compiled`), all in a child process
(`app.learner.check`), then serve the recorded compiled model: torch and fastai, about 1 GB once
imported, never stay in the serving process. A model whose predictor needs them (fastai
preprocessing, the torch backend, a custom activation) is loaded in this process instead.

Fast path, when such a record matches this export and these library versions: serve the compiled
model at once, and check the learner again in the background, in a child process too. Either way
the learner is loaded and checked on every start; on the fast path it no longer holds up readiness.
Should the learner ever disagree with the record, the record it writes replaces the compiled model
being served.

Bundle: MODEL_PATH is a checked bundle folder (`app.core.bundle`): it is served as it is, once every
part of it has been checked, and no learner is ever loaded (torch and fastai need not be installed).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.core.bundle import BundleManifest, is_bundle, load_bundle
from app.core.compiled import CompiledModel, Manifest, cache_dirs, load_compiled
from app.core.detector import load_detector, single_threaded_blas
from app.core.model_file import ModelFile, ModelLoadError
from app.core.runner import Predictor
from app.learner.check import checked_predictor
from app.learner.loading import load_learner_from
from app.serving.classifier import Classifier, ServedModel
from app.serving.config import Settings
from app.serving.metrics import Metrics
from app.serving.model_source import fetch_model_file

log = logging.getLogger(__name__)
LEARNER_THREAD = "learner-loader"
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class LearnerState(enum.Enum):
    LOADED = "loaded"
    LOADING = "loading"  # fast path: loading in the background while the compiled model serves
    FAILED = "failed"  # fast path: it did not load; the compiled model checked against it serves on
    NOT_USED = "not used"  # a bundle: checked against its learner when it was made


@dataclass
class Serving:
    """The running classifier and the state of the learner behind it."""

    classifier: Classifier
    learner: LearnerState
    learner_error: str | None = None  # why the learner failed to load, when it did
    background: asyncio.Task | None = None
    bundle: BundleManifest | None = None  # what a bundle says of itself, when one is served

    @property
    def precision(self) -> str:
        """"int8" for a quantized bundle; an export or an FP32 bundle answers in full precision."""
        return self.bundle.precision if self.bundle is not None else "fp32"

    def learner_status(self) -> str:
        """What `/model` says: loaded, loading, or failed: <reason>."""
        if self.learner is LearnerState.FAILED:
            return f"failed: {self.learner_error}"
        return self.learner.value

    async def stop(self) -> None:
        if self.background is not None:
            self.background.cancel()  # kills a learner check still running in its child process
            await asyncio.gather(self.background, return_exceptions=True)
        await asyncio.to_thread(self.classifier.stop)


@dataclass
class Opened:
    """A model ready to serve, and what is still to be done about its learner."""

    served: ServedModel
    learner: LearnerState
    bundle: BundleManifest | None = None
    compiled: CompiledModel | None = None  # fast path: checked again in the background
    with_features: bool = False


async def open_model(settings: Settings, fast_start: bool = True) -> Opened:
    """The configured model, checked and ready to serve; `ModelLoadError` if it cannot be served."""
    if is_bundle(settings.model_path):
        return await asyncio.to_thread(_open_bundle, settings)
    file = await fetch_model_file(settings.model_path, settings.model_url, settings.model_sha256)
    detector = await asyncio.to_thread(load_detector, file)
    with_features = detector is not None
    if with_features:
        single_threaded_blas()
    folders = await asyncio.to_thread(cache_dirs, file.path, settings.cache_dir)
    compiled = None
    if fast_start and settings.backend != "torch":
        compiled = await asyncio.to_thread(load_compiled, file, folders.lookup, settings.threads, with_features)
        if compiled is not None:
            served = ServedModel(file, compiled.vocab, compiled.predictor, detector)
            return Opened(served, LearnerState.LOADING, compiled=compiled, with_features=with_features)
    if settings.backend != "torch":
        if folders.fallback_note:
            log.warning("%s", folders.fallback_note)
        if await check_in_child(file, settings, with_features, folders.write) is not None:
            compiled = await asyncio.to_thread(load_compiled, file, folders.lookup, settings.threads, with_features)
    if compiled is not None:
        return Opened(ServedModel(file, compiled.vocab, compiled.predictor, detector), LearnerState.LOADED)
    log.info("loading the learner in this process: its predictor needs torch or fastai")
    model = await asyncio.to_thread(load_learner_from, file, settings.model_code)
    predictor, _ = await asyncio.to_thread(checked_predictor, model, settings.threads, settings.backend, with_features,
                                           folders.write)
    return Opened(ServedModel(file, model.vocab, predictor, detector), LearnerState.LOADED)


async def start_serving(settings: Settings, metrics: Metrics, fast_start: bool = True) -> Serving:
    """A started classifier for the configured model; `ModelLoadError` if it cannot be served."""
    opened = await open_model(settings, fast_start)
    serving = Serving(Classifier(opened.served, settings, metrics), opened.learner)
    _adopt(serving, opened, settings)
    serving.classifier.start()
    return serving


def _adopt(serving: Serving, opened: Opened, settings: Settings) -> None:
    serving.learner, serving.learner_error, serving.bundle = opened.learner, None, opened.bundle
    if opened.compiled is not None:
        serving.background = asyncio.create_task(
            _check_behind(serving, opened.compiled, settings, opened.with_features))


async def reload(serving: Serving, settings: Settings, metrics: Metrics) -> bool:
    """Load MODEL_PATH again beside the model in service, check it exactly as at start-up, and switch
    to it between batches (SIGHUP). A model that fails its check is refused and the old one keeps
    serving. Whether it switched."""
    old = serving.classifier.model
    started = time.perf_counter()
    try:
        opened = await open_model(settings)
    except ModelLoadError as exc:
        metrics.reloads.labels("refused").inc()
        log.error("reload refused: %s; still serving %s (sha256 %s)", exc, old.file.path, old.file.sha256[:12])
        return False
    if serving.background is not None:
        serving.background.cancel()
        await asyncio.gather(serving.background, return_exceptions=True)
    serving.classifier.swap(opened.served)
    _adopt(serving, opened, settings)
    metrics.reloads.labels("switched").inc()
    log.info("reloaded in %.1f s: now serving %s (sha256 %s, was %s)", time.perf_counter() - started,
             opened.served.file.path, opened.served.file.sha256[:12], old.file.sha256[:12])
    return True


async def check_in_child(file: ModelFile, settings: Settings, with_features: bool,
                         cache_dir: Path | None) -> Manifest | None:
    """Load and check the learner in a child process (`app.learner.check`); the record it wrote, or
    None if the model's predictor needs torch or fastai; `ModelLoadError` if the learner cannot
    be loaded. Cancelling this kills the child."""
    request = {"model": str(file.path), "sha256": file.sha256, "cache_dir": str(cache_dir) if cache_dir else None,
               "threads": settings.threads, "backend": settings.backend, "with_features": with_features,
               "code": str(settings.model_code) if settings.model_code else None,
               "log_level": settings.log_level, "log_format": settings.log_format}
    # The project first on the child's path, wherever the server was started from, then the
    # caller's own (the modules an export's custom functions live in).
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.learner.check", json.dumps(request), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path})
    try:
        out, _ = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise ModelLoadError(f"checking the learner failed (the check exited with status {child.returncode}; "
                             "see the log above)") from None
    if answer["error"]:
        raise ModelLoadError(answer["error"])
    return Manifest(**answer["manifest"]) if answer["manifest"] else None


def _open_bundle(settings: Settings) -> Opened:
    if settings.backend == "torch":
        raise ModelLoadError(f"INFERENCE_BACKEND=torch, but {settings.model_path} is a bundle, which runs in ONNX "
                             "Runtime: use auto or onnx")
    bundle = load_bundle(settings.model_path, settings.threads)
    if settings.model_sha256 and settings.model_sha256 != bundle.file.sha256:
        raise ModelLoadError(f"bundle {settings.model_path} was made from an export with sha256 {bundle.file.sha256}, "
                             f"but MODEL_SHA256 is {settings.model_sha256}: fix MODEL_SHA256 or the bundle")
    if bundle.detector is not None:
        single_threaded_blas()
    served = ServedModel(bundle.file, bundle.manifest.classes, bundle.predictor, bundle.detector)
    return Opened(served, LearnerState.NOT_USED, bundle=bundle.manifest)


def still_loading_a_learner() -> bool:
    """Whether a background learner load is still running: an import of torch cannot be
    interrupted, so a shutdown that does not want to wait for it must exit without joining it."""
    return any(t.name.startswith(LEARNER_THREAD) and t.is_alive() for t in threading.enumerate())


def _learner_in_process(file: ModelFile, settings: Settings, with_features: bool,
                       cache_dir: Path | None) -> tuple[Predictor, list[str]]:
    """The learner's own predictor, built in this process (blocking: for a thread of its own)."""
    model = load_learner_from(file, settings.model_code)
    return checked_predictor(model, settings.threads, settings.backend, with_features, cache_dir)[0], model.vocab


async def _replacement(file: ModelFile, settings: Settings, with_features: bool, cache_dir: Path | None,
                       fresh: Manifest | None) -> tuple[Predictor, list[str]]:
    """What serves once the learner disagreed with the record: the compiled model the child has just
    checked and recorded, or, when its predictor needs torch or fastai, the learner's own."""
    if fresh is not None:
        folders = (cache_dir,) if cache_dir else ()
        compiled = await asyncio.to_thread(load_compiled, file, folders, settings.threads, with_features)
        if compiled is not None:
            return compiled.predictor, compiled.vocab
    # Its own thread, not the event loop's default executor, which asyncio joins on the way out.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LEARNER_THREAD)
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, _learner_in_process, file, settings, with_features, cache_dir)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


async def _check_behind(serving: Serving, compiled: CompiledModel, settings: Settings, with_features: bool) -> None:
    file = serving.classifier.model.file
    # The same folder as the compiled model being served, so that the check reuses its file.
    cache_dir = compiled.predictor.onnx_path.parent if compiled.predictor.onnx_path else None
    try:
        fresh = await check_in_child(file, settings, with_features, cache_dir)
        if fresh is not None and fresh.serves_like(compiled.manifest):
            log.info("learner loaded in the background; it agrees with the compiled model being served")
        else:
            predictor, vocab = await _replacement(file, settings, with_features, cache_dir, fresh)
            log.warning("the learner disagrees with the compiled model recorded for it; serving the learner's "
                        "own predictor (%s, %s preprocessing) from now on", predictor.backend,
                        predictor.preprocessing)
            serving.classifier.use(predictor, vocab)
    except Exception as exc:  # noqa: BLE001 - reported, and the checked compiled model keeps serving
        reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        serving.learner, serving.learner_error = LearnerState.FAILED, reason
        log.error("the learner failed to load in the background (%s); still serving the compiled model that "
                  "was checked against it on an earlier start", reason)
        return
    serving.learner = LearnerState.LOADED
