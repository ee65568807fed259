"""Reading a learner's inference preprocessing and activation, to be reproduced without fastai.

`fast_preprocess_from` turns the learner's validation-time transforms into an
`app.core.preprocess.FastPreprocess` (or says why it cannot); `fastai_preprocess` is fastai's own
pipeline, the fallback; `activation` names the loss function's activation when NumPy reproduces it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from app.core.preprocess import FastPreprocess, ResizeStep, channels, per_channel
from app.core.runner import ACTIVATIONS, Activation, Preprocess, softmax


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
    mode = input_mode(learn)
    divisor, mean, std = 1.0, (0.0,) * channels(mode), (1.0,) * channels(mode)
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
            if tfm.mean is None or tfm.mean.numel() != channels(mode):
                return None, f"Normalize does not have one value per channel of mode {mode}"
            mean = per_channel(tfm.mean.detach().cpu().flatten().tolist(), mode)
            std = per_channel(tfm.std.detach().cpu().flatten().tolist(), mode)
        else:
            return None, f"transform {type(tfm).__name__} applies at inference and is not reproduced"
    # No Resize or RandomResizedCrop: fastai feeds every photo at its own size, and so do we.
    return FastPreprocess(resize or ResizeStep("none", (0, 0), 0), divisor, mean, std, mode), ""


def input_mode(learn: Any) -> str:
    """"L" for a learner whose inputs are fastai `PILImageBW` (every photo opened as grayscale),
    otherwise "RGB": found by letting the learner's own type transform open a small PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 10, 10)).save(buffer, "PNG")
    dataset = getattr(getattr(learn.dls, "valid", None), "dataset", None)
    for tfm in reversed(getattr(getattr(getattr(dataset, "tls", [None])[0], "tfms", None), "fs", [])):
        try:
            opened = tfm(buffer.getvalue())
        except Exception:  # not the transform that opens images
            continue
        if isinstance(opened, Image.Image):
            return "L" if opened.mode == "L" else "RGB"
    return "RGB"


def _size(size: Any) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    return width, height


def fastai_preprocess(learn: Any) -> Preprocess:
    """fastai's own pipeline, used when the fast one cannot reproduce it. Serialised by a lock:
    fastai transforms keep per-call state (RandomResizedCrop stores sizes on itself)."""
    lock = threading.Lock()

    mode = input_mode(learn)

    def preprocess(img: Image.Image) -> np.ndarray:
        # fastai opens a photo file in the learner's mode; given an image already open, it keeps its mode.
        img = img if img.mode == mode else img.convert(mode)
        with lock:
            dl = learn.dls.test_dl([img], num_workers=0)
            (batch,) = dl.one_batch()[:1]
        return batch[0].cpu().numpy().astype(np.float32)

    return preprocess


def activation(learn: Any) -> tuple[Activation, Callable[[np.ndarray], np.ndarray]]:
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
            return ("softmax" if name == "softmax" else "sigmoid"), fn
    return "custom", learners_own


def gives_raw_scores(learn: Any) -> bool:
    """Whether learn.predict gives raw scores: its loss function has no activation, as fastbook's
    `Learner(dls, model, loss_func=F.cross_entropy)`. The server answers their softmax, the
    probabilities that a cross-entropy loss trains; fastai's own losses all have an activation."""
    return getattr(learn.loss_func, "activation", None) is None


def decision_threshold(learn: Any, activation_name: Activation) -> float | None:
    """A multi-label learner's threshold: its loss function's `thresh` (fastai's
    BCEWithLogitsLossFlat decodes `probability > thresh`, 0.5 by default); None for a single-label
    learner, which decodes to its most probable class."""
    thresh = getattr(learn.loss_func, "thresh", None)
    if thresh is None and activation_name != "sigmoid":
        return None
    return float(thresh) if thresh is not None else 0.5
