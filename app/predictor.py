"""A fast CPU predictor built from a fastai learner.

`learn.predict` is slow for serving: it builds a DataLoader per image, runs Python transforms and
a torch forward pass with autograd bookkeeping. Here the learner's own inference preprocessing
(resize/crop method, size, normalisation, read from its transforms) is reproduced with Pillow and
NumPy, and the model runs in ONNX Runtime. Anything that cannot be reproduced exactly falls back to
fastai's own pipeline or to torch, and a start-up self-check compares the fast path with fastai on
a sample image, so a fast answer is never a different answer.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.model_store import ModelLoadError

log = logging.getLogger("app.predictor")

Preprocess = Callable[[Image.Image], np.ndarray]
# A model runtime: a batch in, its outputs out (logits, then the pooled features when asked for).
Runner = Callable[[np.ndarray], list[np.ndarray]]
# What a predictor gives for a batch: class probabilities, and the detector's features (or None).
Inference = tuple[np.ndarray, np.ndarray | None]
# Largest difference allowed between the fast path and fastai's for the fast path to be used.
SELF_CHECK_TOLERANCE = 1e-4


# --- Preprocessing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeStep:
    """fastai `Resize` or `RandomResizedCrop` as applied to the validation set, in Pillow."""

    kind: str  # "crop", "squish", "pad" (Resize methods) or "rrc" (RandomResizedCrop)
    size: tuple[int, int]  # (width, height)
    resample: int
    val_xtra: float = 0.0

    @property
    def largest_resize(self) -> int:
        if self.kind == "rrc":
            return max(self.size) + _rrc_extra(self.size, self.val_xtra)
        return max(self.size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        tw, th = self.size
        if self.kind == "squish":
            return img.resize((tw, th), self.resample)
        if self.kind == "rrc":
            xtra = _rrc_extra(self.size, self.val_xtra)
            img = img.resize((tw + xtra, th + xtra), self.resample)
            left, top = xtra // 2, xtra // 2
            return img.crop((left, top, left + tw, top + th))
        # Resize crop/pad: the same arithmetic as fastai's Resize.encodes with centred pcts.
        scale = w / tw if (w / tw < h / th) == (self.kind == "crop") else h / th
        cw, ch = int(scale * tw), int(scale * th)
        left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
        if self.kind == "crop":
            return img.crop((left, top, left + cw, top + ch)).resize((tw, th), self.resample)
        canvas = Image.new("RGB", (cw, ch))  # zero padding
        canvas.paste(img, (-left, -top))
        return canvas.resize((tw, th), self.resample)


def _rrc_extra(size: tuple[int, int], val_xtra: float) -> int:
    import math

    return math.ceil(max(size) * val_xtra / 8) * 8


@dataclass(frozen=True)
class FastPreprocess:
    """Resize, scale to [0, 1] and normalise, to a float32 CHW array. Pure and thread-safe."""

    resize: ResizeStep
    divisor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def draft_size(self) -> tuple[int, int]:
        # JPEG draft decoding keeps at least three times the largest size the resize step
        # produces, so the antialiased resize that follows sees enough pixels for the same result.
        # Measured on the bear photos enlarged to 12 MP: at 2x probabilities moved by up to 1.3e-3,
        # at 3x by 1.2e-5 (tests/test_predictor.py holds it under 1e-3).
        side = 3 * self.resize.largest_resize
        return side, side

    def __call__(self, img: Image.Image) -> np.ndarray:
        # Contiguous channel planes first: arithmetic on a transposed view is several times slower.
        planes = np.ascontiguousarray(np.asarray(self.resize(img)).transpose(2, 0, 1)).astype(np.float32)
        # The same float32 operations, in the same order, as fastai's IntToFloatTensor and Normalize.
        planes /= np.float32(self.divisor)
        planes -= np.float32(self.mean)[:, None, None]
        planes /= np.float32(self.std)[:, None, None]
        return planes

    def spec(self) -> dict[str, Any]:
        """A JSON-ready description, from which `from_spec` rebuilds an identical step."""
        return {"kind": self.resize.kind, "size": list(self.resize.size), "resample": self.resize.resample,
                "val_xtra": self.resize.val_xtra, "divisor": self.divisor, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FastPreprocess:
        resize = ResizeStep(str(spec["kind"]), (int(spec["size"][0]), int(spec["size"][1])), int(spec["resample"]),
                            float(spec["val_xtra"]))
        if resize.kind not in ("crop", "squish", "pad", "rrc"):
            raise ValueError(f"unknown resize kind {resize.kind!r}")
        return cls(resize, float(spec["divisor"]), _rgb(spec["mean"]), _rgb(spec["std"]))


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b


def fast_preprocess_from(learn: Any) -> tuple[FastPreprocess | None, str]:
    """Read the learner's validation-time transforms; (None, why) if any is not reproducible."""
    from fastai.vision.all import (
        AffineCoordTfm,
        IntToFloatTensor,
        Normalize,
        RandomResizedCrop,
        Resize,
        ResizeMethod,
        ToTensor,
    )

    resize: ResizeStep | None = None
    divisor, mean, std = 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    dl = learn.dls.valid if hasattr(learn.dls, "valid") else learn.dls[0]
    for tfm in [*dl.after_item.fs, *dl.after_batch.fs]:
        if getattr(tfm, "split_idx", None) == 0:
            continue  # training-only augmentation
        if isinstance(tfm, RandomResizedCrop) and resize is None:
            resize = ResizeStep("rrc", _size(tfm.size), int(tfm.mode), float(tfm.val_xtra))
        elif isinstance(tfm, Resize) and resize is None:
            if tfm.method == ResizeMethod.Pad and str(tfm.pad_mode) != "zeros":
                return None, f"Resize pad_mode {tfm.pad_mode!r} is not reproduced"
            kind = {ResizeMethod.Crop: "crop", ResizeMethod.Squish: "squish", ResizeMethod.Pad: "pad"}[tfm.method]
            resize = ResizeStep(kind, _size(tfm.size), int(tfm.mode))
        elif isinstance(tfm, ToTensor):
            continue
        elif isinstance(tfm, AffineCoordTfm) and tfm.size is None:
            # aug_transforms' Flip/Rotate/Zoom/Warp resample through an identity matrix outside
            # training: a no-op (up to float rounding, which the self-check bounds).
            continue
        elif isinstance(tfm, IntToFloatTensor):
            divisor = float(tfm.div)
        elif isinstance(tfm, Normalize):
            if tfm.mean is None or tfm.mean.numel() != 3:
                return None, "Normalize is not per-channel RGB"
            mean = _rgb(tfm.mean.detach().cpu().flatten().tolist())
            std = _rgb(tfm.std.detach().cpu().flatten().tolist())
        else:
            return None, f"transform {type(tfm).__name__} applies at inference and is not reproduced"
    if resize is None:
        return None, "no Resize or RandomResizedCrop transform: input sizes would vary"
    return FastPreprocess(resize, divisor, mean, std), ""


def _size(size: Any) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    return width, height


def fastai_preprocess(learn: Any) -> Preprocess:
    """fastai's own pipeline, used when the fast one cannot reproduce it. Serialised by a lock:
    fastai transforms keep per-call state (RandomResizedCrop stores sizes on itself)."""
    lock = threading.Lock()

    def preprocess(img: Image.Image) -> np.ndarray:
        with lock:
            dl = learn.dls.test_dl([img], num_workers=0)
            (batch,) = dl.one_batch()[:1]
        return batch[0].cpu().numpy().astype(np.float32)

    return preprocess


# --- Model runtimes ------------------------------------------------------------------------------


def torch_runner(model: Any, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(torch.from_numpy(batch))
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def export_onnx(model: Any, sample: np.ndarray, dest: Path, features: bool = False) -> None:
    """Export to ONNX with a dynamic batch axis, written atomically next to `dest`. With `features`,
    `model` is an `app.features.LogitsAndFeatures` and the graph has a second output."""
    import torch

    outputs = ["logits", "features"] if features else ["logits"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(), (torch.from_numpy(sample),), buffer, input_names=["input"], output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["input", *outputs]}, opset_version=17, dynamo=False,
        )
    write_atomically(dest, buffer.getvalue())


def write_atomically(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        # mkstemp's 0600 would hide the file from a server running as another user than the one
        # that compiled it (the Dockerfile compiles as root and serves as an unprivileged user).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def onnx_runner(path: Path, threads: int) -> Runner:
    # Read when onnxruntime is first imported. Telemetry has no place in a self-hosted service,
    # and where the user has no home folder ONNX Runtime logs a warning about it at every start.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads must not spin: image decoding runs on the same cores between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {"input": batch})

    return run


def onnx_cache_path(model_path: Path, sha256: str, features: bool = False, cache_dir: Path | None = None) -> Path:
    """The compiled model lives in `cache_dir` (default: next to the export), named by the export's
    hash (and by whether it also outputs the detector's features), so a changed export.pkl can never
    be served from a stale cache."""
    name = f"{model_path.stem}.{sha256[:16]}{'.features' if features else ''}.onnx"
    return (cache_dir or model_path.parent) / name


# --- The predictor -------------------------------------------------------------------------------


@dataclass
class Predictor:
    """`prepare` turns an image into model input (any thread); `infer` runs a batch (one thread) and
    gives its class probabilities, and its pooled features when built with `features=True`."""

    prepare: Preprocess
    infer: Callable[[np.ndarray], Inference]
    backend: str
    preprocessing: str
    draft_size: tuple[int, int] | None
    activation: str = "custom"  # "softmax", "sigmoid", or "custom" (the learner's own, run by torch)
    onnx_path: Path | None = None  # the compiled model file, when it outlives this process


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"softmax": softmax, "sigmoid": sigmoid}


def activation(learn: Any) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The loss function's activation as learn.predict applies it (softmax for single-label
    classifiers, sigmoid for multi-label ones), named when NumPy reproduces it, so that a compiled
    model can be served without torch."""
    import torch

    act = getattr(learn.loss_func, "activation", None)
    if act is None:
        return "softmax", softmax

    def learners_own(logits: np.ndarray) -> np.ndarray:
        return np.asarray(act(torch.from_numpy(logits)), dtype=np.float32)

    probe = np.random.default_rng(0).normal(0, 4, (4, 5)).astype(np.float32)
    expected = learners_own(probe)
    for name, fn in ACTIVATIONS.items():
        if np.abs(fn(probe) - expected).max() <= 1e-6:
            return name, fn
    return "custom", learners_own


def sample_image() -> Image.Image:
    """A deterministic, non-square, detailed image for the start-up self-check."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:301, 0:457]
    base = np.stack([xx * 255 / 457, yy * 255 / 301, (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def build_predictor(learn: Any, model_path: Path, sha256: str, threads: int, backend: str = "auto",
                    features: bool = False, cache_dir: Path | None = None) -> Predictor:
    """The fastest predictor that gives the same answers as the learner (and, with `features`, the
    same pooled features from the same forward pass, for the unfamiliar-image detector). The
    compiled model is kept in `cache_dir` (default: next to the export)."""
    import torch

    from app.features import with_features

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

    model = learn.model.eval()
    if features:
        model = with_features(model)
        if model is None:
            raise ModelLoadError("the model has a detector file but is not shaped like a fastai vision_learner "
                                 "model (body, then a head that pools and flattens): remove the detector file")
    activation_name, to_probs = activation(learn)
    torch_run = torch_runner(model, threads)
    batch = expected_input[None]
    expected = torch_run(batch)
    run, used, onnx_path = torch_run, "torch", None
    if backend in ("auto", "onnx"):
        try:
            cache = onnx_cache_path(model_path, sha256, features, cache_dir)
            run, onnx_path = _onnx_with_cache(model, batch, cache, threads, features)
            diff = max(float(np.abs(got - want).max()) for got, want in zip(run(batch), expected, strict=True))
            if diff > 1e-3:
                raise ValueError(f"ONNX output differs from torch by {diff:.2g}")
            used = "onnx"
        except Exception as exc:  # any exporter or runtime failure: serve with torch instead
            if backend == "onnx":
                raise ModelLoadError(f"INFERENCE_BACKEND=onnx, but the ONNX path is unusable for this model "
                                     f"({type(exc).__name__}: {exc}); use auto or torch") from None
            log.warning("ONNX path unusable, serving with torch (%s: %s)", type(exc).__name__, exc)
            run, onnx_path = torch_run, None

    return Predictor(prepare=prepare, infer=inference(run, to_probs), backend=used, preprocessing=preprocessing,
                     draft_size=draft, activation=activation_name, onnx_path=onnx_path)


def inference(run: Runner, to_probs: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], Inference]:
    def infer(batch: np.ndarray) -> Inference:
        logits, *features = run(batch)
        return to_probs(logits), (features[0] if features else None)

    return infer


def _onnx_with_cache(model: Any, batch: np.ndarray, cache: Path, threads: int,
                     features: bool) -> tuple[Runner, Path | None]:
    """An ONNX Runtime runner and the cache file it was loaded from (None if it could not be kept)."""
    if cache.exists():
        try:
            return onnx_runner(cache, threads), cache
        except Exception as exc:  # unreadable or truncated cache: rebuild it below
            log.warning("ignoring unreadable ONNX cache %s (%s)", cache, exc)
    try:
        export_onnx(model, batch, cache, features)
        log.info("compiled model to %s", cache)
        return onnx_runner(cache, threads), cache
    except OSError:
        # Read-only cache folder: compile to a temporary file for this process only.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / cache.name
            export_onnx(model, batch, path, features)
            return onnx_runner(path, threads), None
