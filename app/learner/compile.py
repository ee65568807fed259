"""A fast CPU predictor built from a fastai learner, checked against it.

`learn.predict` is slow for serving: it builds a DataLoader per image, runs Python transforms and
a torch forward pass with autograd bookkeeping. Here the learner's own inference preprocessing is
reproduced with Pillow and NumPy (`app.learner.reproduce`), and the model runs in ONNX Runtime.
Anything that cannot be reproduced exactly falls back to fastai's own pipeline or to torch, and a
self-check compares the fast path with fastai on a sample image, so a fast answer is never a
different answer.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.core.files import write_atomically
from app.core.model_file import ModelLoadError
from app.core.runner import Backend, BackendChoice, Predictor, Preprocess, Runner, inference, onnx_runner
from app.learner.features import with_features as split_features
from app.learner.reproduce import (
    activation,
    decision_threshold,
    fast_preprocess_from,
    fastai_preprocess,
    gives_raw_scores,
)

log = logging.getLogger(__name__)

# Largest difference allowed between the fast preprocessing and fastai's for the fast one to be used.
SELF_CHECK_TOLERANCE = 1e-4
# Largest difference allowed between ONNX Runtime's outputs and torch's.
ONNX_TOLERANCE = 1e-3


def torch_runner(model: Any, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(torch.from_numpy(batch))
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def export_onnx(model: Any, sample: np.ndarray, dest: Path, with_features: bool = False,
                any_size: bool = False) -> None:
    """Export to ONNX with a dynamic batch axis, written atomically to `dest`. With `with_features`,
    `model` is an `app.learner.features` wrapper and the graph has a second output. With `any_size`,
    height and width are dynamic too (a model without a Resize takes photos at their own size)."""
    import torch

    outputs = ["logits", "features"] if with_features else ["logits"]
    axes = {name: {0: "batch"} for name in ["input", *outputs]}
    if any_size:
        axes["input"] = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(), (torch.from_numpy(sample),), buffer, input_names=["input"], output_names=outputs,
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )
    write_atomically(dest, buffer.getvalue())


def sample_image() -> Image.Image:
    """A deterministic, non-square, detailed image for the self-check."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:301, 0:457]
    base = np.stack([xx * 255 / 457, yy * 255 / 301, (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def build_predictor(learn: Any, threads: int, backend: BackendChoice = "auto", with_features: bool = False,
                    onnx_path: Path | None = None, require_file: bool = False) -> Predictor:
    """The fastest predictor that gives the same answers as the learner (and, `with_features`, the
    same pooled features from the same forward pass, for the unfamiliar-image detector). The
    compiled model is kept at `onnx_path` (None: a temporary file for this process only); with
    `require_file`, an `OSError` writing it is raised instead of compiling for this process only."""
    import torch

    torch.set_num_threads(threads)
    img = sample_image()
    reference = fastai_preprocess(learn)
    expected_input = reference(img)

    prepare: Preprocess
    fast, why = fast_preprocess_from(learn)
    if fast is not None and np.abs(fast(img) - expected_input).max() <= SELF_CHECK_TOLERANCE:
        prepare, preprocessing, draft = fast, "pillow-numpy", fast.draft_size
    else:
        why = why or "fast preprocessing differs from fastai's on the self-check image"
        log.info("using fastai preprocessing: %s", why)
        prepare, preprocessing, draft = reference, "fastai", None

    # A learner without a Resize gives inputs of each photo's own size: its graph must take any size,
    # and is checked at two sizes.
    other_input = reference(img.resize((img.width // 2 + 17, img.height // 2 + 5)))
    any_size = other_input.shape != expected_input.shape
    checks = [expected_input[None], *([other_input[None]] if any_size else [])]

    model = learn.model.eval()
    if with_features:
        model = split_features(model)
        if model is None:
            raise ModelLoadError("the model has a detector file but is not shaped like a fastai vision_learner "
                                 "model (body, then a head that pools and flattens): remove the detector file")
    activation_name, to_probs = activation(learn)
    torch_run = torch_runner(model, threads)
    run, used, kept_at = torch_run, "torch", None
    if backend in ("auto", "onnx"):
        try:
            run, kept_at = _onnx_with_cache(model, checks, onnx_path, threads, with_features, require_file, any_size)
            diff = max(float(np.abs(got - want).max())
                       for check in checks for got, want in zip(run(check), torch_run(check), strict=True))
            if diff > ONNX_TOLERANCE:
                raise ValueError(f"ONNX output differs from torch by {diff:.2g}")
            used = "onnx"
        except Exception as exc:  # any exporter or runtime failure: serve with torch instead
            if require_file and isinstance(exc, OSError):
                raise
            if backend == "onnx":
                raise ModelLoadError(f"INFERENCE_BACKEND=onnx, but the ONNX path is unusable for this model "
                                     f"({type(exc).__name__}: {exc}); use auto or torch") from None
            log.warning("ONNX path unusable, serving with torch (%s: %s)", type(exc).__name__, exc)
            run, kept_at = torch_run, None

    backend_used: Backend = "onnx" if used == "onnx" else "torch"
    return Predictor(prepare=prepare, infer=inference(run, to_probs), backend=backend_used,
                     preprocessing=preprocessing, draft_size=draft, activation=activation_name, onnx_path=kept_at,
                     threshold=decision_threshold(learn, activation_name), raw_scores=gives_raw_scores(learn))


def _onnx_with_cache(model: Any, checks: list[np.ndarray], cache: Path | None, threads: int, with_features: bool,
                     require_file: bool, any_size: bool) -> tuple[Runner, Path | None]:
    """An ONNX Runtime runner and the file it was loaded from (None if it could not be kept)."""
    batch = checks[0]
    if cache is not None and cache.exists():
        try:
            cached = onnx_runner(cache, threads)
            for check in checks:
                cached(check)  # a graph compiled for one size must not serve a model that takes any
            return cached, cache
        except Exception as exc:  # unreadable, truncated or of fixed size: rebuild it below
            log.warning("ignoring unusable ONNX cache %s (%s)", cache, exc)
    if cache is not None:
        try:
            export_onnx(model, batch, cache, with_features, any_size)
            log.info("compiled model to %s", cache)
            return onnx_runner(cache, threads), cache
        except OSError:
            if require_file:
                raise
            # A read-only cache folder: compile for this process only, below.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, batch, path, with_features, any_size)
        return onnx_runner(path, threads), None

