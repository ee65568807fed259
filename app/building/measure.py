"""Measuring a model the way the server runs it: every photo through the serving path's decoding,
preprocessing, compiled model and detector (`app.core`), then accuracy, confusion matrices and the
detector's flagged rates. Used by `app.evaluate`, and by `app.train` for its validation figures."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.building.cli import UsageError
from app.building.datasets import image_files, labelled_files
from app.core.detector import Detector
from app.core.images import MAX_PIXELS, ImageError
from app.core.prediction import prepare_image
from app.core.runner import Predictor


@dataclass
class Outputs:
    """What the model gives for each photo that decoded, in `files` order."""

    files: list[Path]
    probs: np.ndarray  # (n, classes)
    features: np.ndarray | None  # (n, d) pooled features, when the predictor outputs them
    unfamiliar: np.ndarray | None  # (n,) bool, when there is a detector
    failed: list[Path]


def run_over_files(files: Iterable[Path], prepare: Callable[[bytes], np.ndarray],
                   run: Callable[[np.ndarray], Sequence[Any]],
                   batch_size: int = 16) -> tuple[list[Path], list[Path], list[np.ndarray | None]]:
    """`run` on batches of prepared image files: the files that decoded, those that did not, and
    each of `run`'s outputs concatenated over the batches (None where `run` gave None; no outputs at
    all if nothing decoded)."""
    kept: list[Path] = []
    failed: list[Path] = []
    results: list[Sequence[Any]] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            results.append(run(np.stack(pending)))
            pending.clear()

    for path in files:
        try:
            array = prepare(path.read_bytes())
        except (ImageError, OSError):
            failed.append(path)
            continue
        if pending and array.shape != pending[0].shape:
            flush()  # a model without a Resize: a batch holds photos of one size only
        pending.append(array)
        kept.append(path)
        if len(pending) == batch_size:
            flush()
    flush()
    outputs = [None if parts[0] is None else np.concatenate(parts) for parts in zip(*results, strict=True)]
    return kept, failed, outputs


def predict_files(predictor: Predictor, detector: Detector | None, files: Iterable[Path], batch_size: int = 16,
                  max_pixels: int = MAX_PIXELS) -> Outputs:
    """Run the predictor on image files exactly as the server runs it on uploads."""
    kept, failed, outputs = run_over_files(files, lambda data: prepare_image(data, predictor, max_pixels),
                                           predictor.infer, batch_size)
    if not kept:
        raise UsageError("none of the photos could be decoded")
    probs, all_features = outputs
    flags = None
    if detector is not None and all_features is not None:
        flags = detector.unfamiliar(all_features, probs.argmax(axis=1))
    return Outputs(kept, probs, all_features, flags, failed)


# --- Figures -------------------------------------------------------------------------------------


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: actual class; columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def rate(flags: np.ndarray | None) -> dict[str, Any] | None:
    if flags is None:
        return None
    share = round(float(flags.mean()), 4) if len(flags) else None
    return {"flagged": int(flags.sum()), "images": len(flags), "rate": share}


def group_rates(outputs: Outputs, group: Any) -> dict[str, dict[str, Any] | None]:
    """Flagged rates per group (`group(path)` names it), in name order."""
    assert outputs.unfamiliar is not None
    names = np.array([group(path) for path in outputs.files])
    return {name: rate(outputs.unfamiliar[names == name]) for name in sorted(set(names.tolist()))}


def evaluate(predictor: Predictor, detector: Detector | None, vocab: list[str], data: Path,
             unfamiliar: Path | None = None) -> dict[str, Any]:
    """All figures, as a JSON-ready dict."""
    files, labels = labelled_files(data, vocab)
    if unfamiliar is not None:
        unfamiliar_files(unfamiliar)  # bad input is reported before the long part
    outputs = predict_files(predictor, detector, files)
    target_of = dict(zip(files, labels, strict=True))
    targets = np.array([target_of[f] for f in outputs.files])
    predicted = outputs.probs.argmax(axis=1)
    report: dict[str, Any] = {
        "classes": vocab,
        "images": len(outputs.files),
        "undecodable": [str(p) for p in outputs.failed],
        "accuracy": round(float((predicted == targets).mean()), 4),
        "errors": int((predicted != targets).sum()),
        "confusion_matrix": {"labels": vocab,
                             "rows_actual_cols_predicted": confusion_matrix(targets, predicted, len(vocab)).tolist()},
        "detector": detector.describe() if detector is not None else None,
        "photos": per_photo(outputs, targets, vocab),
    }
    if outputs.unfamiliar is not None:
        report["flagged_known"] = {"overall": rate(outputs.unfamiliar),
                                   "per_class": group_rates(outputs, lambda p: p.parent.name)}
    if unfamiliar is not None:
        report["flagged_unfamiliar"] = unfamiliar_rates(predictor, detector, unfamiliar)
    return report


def per_photo(outputs: Outputs, targets: np.ndarray, vocab: list[str]) -> list[dict[str, Any]]:
    """Each photo's answer: its file, actual and predicted class, that class's probability, and the
    detector's verdict (None without a detector)."""
    rows = []
    for i, (path, target, probs) in enumerate(zip(outputs.files, targets, outputs.probs, strict=True)):
        guess = int(probs.argmax())
        rows.append({"file": str(path), "actual": vocab[target], "predicted": vocab[guess],
                     "probability": round(float(probs[guess]), 4),
                     "unfamiliar": None if outputs.unfamiliar is None else bool(outputs.unfamiliar[i])})
    return rows


def unfamiliar_files(folder: Path) -> list[Path]:
    """The photos of no class: every image below `folder`, whose sub-folders are categories."""
    if not folder.is_dir():
        raise UsageError(f"folder of unfamiliar photos not found: {folder}")
    files = image_files(folder, recursive=True)
    if not files:
        raise UsageError(f"no images in {folder}")
    return files


def unfamiliar_rates(predictor: Predictor, detector: Detector | None, folder: Path) -> dict[str, Any] | None:
    """How many photos of no class the detector flags, overall and per sub-folder of `folder`
    (photos directly in it count as "."); None without a detector."""
    return folder_rates(predict_files(predictor, detector, unfamiliar_files(folder)), folder)


def folder_rates(outputs: Outputs, folder: Path) -> dict[str, Any] | None:
    """`outputs`' flagged rate, overall and per sub-folder of `folder`; None without flags."""
    if outputs.unfamiliar is None:
        return None

    def category(path: Path) -> str:
        parts = path.relative_to(folder).parts
        return parts[0] if len(parts) > 1 else "."

    return {"overall": rate(outputs.unfamiliar), "per_folder": group_rates(outputs, category)}
