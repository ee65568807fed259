"""Running a compiled model: ONNX Runtime sessions, activations, and the `Predictor` that serving
and evaluation call (prepare an image on any thread, infer a batch on one).

A `Predictor` is built either from a compiled model's checked record (`app.core.compiled`, no
torch) or from a learner (`app.learner.compile`, which may fall back to fastai or torch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Preprocess = Callable[[Image.Image], np.ndarray]
# A model runtime: a batch in, its outputs out (logits, then the pooled features when asked for).
Runner = Callable[[np.ndarray], list[np.ndarray]]
# What a predictor gives for a batch: class probabilities, and the detector's features (or None).
Inference = tuple[np.ndarray, np.ndarray | None]
Backend = Literal["onnx", "torch"]
# INFERENCE_BACKEND: "auto" is ONNX Runtime, and torch when the model cannot be compiled.
BackendChoice = Literal["auto", "onnx", "torch"]
Preprocessing = Literal["pillow-numpy", "fastai"]
# "custom": the learner's own activation, run by torch, because NumPy does not reproduce it.
Activation = Literal["softmax", "sigmoid", "custom"]


@dataclass
class Predictor:
    """`prepare` turns an image into model input (any thread); `infer` runs a batch (one thread) and
    gives its class probabilities, and its pooled features when the model outputs them."""

    prepare: Preprocess
    infer: Callable[[np.ndarray], Inference]
    backend: Backend
    preprocessing: Preprocessing
    draft_size: tuple[int, int] | None  # JPEG draft decoding for this preprocessing, if it allows it
    activation: Activation = "custom"
    onnx_path: Path | None = None  # the compiled model file, when it outlives this process
    # A multi-label model's decision threshold (its loss function's, as learn.predict decodes
    # with it): every class whose probability is above it is in the answer. None: single-label.
    threshold: float | None = None
    # The learner's loss function has no activation (fastbook's `loss_func=F.cross_entropy`):
    # learn.predict gives raw scores, and the probabilities served are their softmax.
    raw_scores: bool = False


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"softmax": softmax, "sigmoid": sigmoid}


def inference(run: Runner, to_probs: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], Inference]:
    """A batch to (probabilities, features or None) for a runner and an activation."""

    def infer(batch: np.ndarray) -> Inference:
        logits, *features = run(batch)
        return to_probs(logits), (features[0] if features else None)

    return infer


def onnx_runner(path: Path, threads: int) -> Runner:
    """An ONNX Runtime session on `threads` threads, tuned for serving next to image decoding."""
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


def onnx_cache_path(model_path: Path, sha256: str, with_features: bool = False, cache_dir: Path | None = None) -> Path:
    """The compiled model lives in `cache_dir` (default: next to the export), named by the export's
    hash (and by whether it also outputs the detector's features), so a changed export.pkl can never
    be served from a stale cache."""
    name = f"{model_path.stem}.{sha256[:16]}{'.features' if with_features else ''}.onnx"
    return (cache_dir or model_path.parent) / name
