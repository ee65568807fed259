"""Evaluate a model the way the server runs it, on photos it never saw.

    python -m app.evaluate DATA [--model models/export.pkl] [--unfamiliar OTHER] [--json FILE]

DATA holds one sub-folder of photos per class (a subset of the model's classes); OTHER, photos that
belong to no class, in any sub-folders (cats/, cars/, ...). Every photo goes through the server's
decoding, preprocessing, compiled model and unfamiliar-image detector. Prints accuracy, the
confusion matrix and how many photos the detector flags (per class of DATA, per sub-folder of
OTHER); `--json FILE` writes the same figures. Exits 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.classifier import prepare_image
from app.datasets import UsageError, image_files
from app.detector import Detector
from app.errors import ApiError
from app.images import MAX_PIXELS
from app.model_store import LoadedModel
from app.predictor import Predictor


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
            pending.append(prepare(path.read_bytes()))
        except (ApiError, OSError):
            failed.append(path)
            continue
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
    flags = detector.unfamiliar(all_features) if detector is not None and all_features is not None else None
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


def labelled_files(data: Path, vocab: list[str]) -> tuple[list[Path], list[int]]:
    """The photos in DATA's class folders, and each one's class index in `vocab`."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    unknown = [p.name for p in folders if p.name not in vocab]
    if unknown:
        raise UsageError(f"folders {', '.join(unknown)} in {data} are not classes of the model "
                         f"(its classes: {', '.join(vocab)})")
    files = [f for folder in folders for f in image_files(folder)]
    if not files:
        raise UsageError(f"no images in the class folders of {data}")
    return files, [vocab.index(f.parent.name) for f in files]


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
    }
    if outputs.unfamiliar is not None:
        report["flagged_known"] = {"overall": rate(outputs.unfamiliar),
                                   "per_class": group_rates(outputs, lambda p: p.parent.name)}
    if unfamiliar is not None:
        report["flagged_unfamiliar"] = unfamiliar_rates(predictor, detector, unfamiliar)
    return report


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
    outputs = predict_files(predictor, detector, unfamiliar_files(folder))
    if outputs.unfamiliar is None:
        return None

    def category(path: Path) -> str:
        parts = path.relative_to(folder).parts
        return parts[0] if len(parts) > 1 else "."

    return {"overall": rate(outputs.unfamiliar), "per_folder": group_rates(outputs, category)}


def format_report(report: dict[str, Any]) -> str:
    vocab = report["classes"]
    lines = [f"accuracy  {report['accuracy']:.2%}  ({report['images'] - report['errors']} of {report['images']})"]
    if report["undecodable"]:
        lines.append(f"undecodable  {len(report['undecodable'])} (skipped)")
    corner = "actual \\ predicted"
    width = max(len(c) for c in [*vocab, corner])
    lines += ["", f"{corner:<{width}}  " + "  ".join(f"{c:>8}" for c in vocab)]
    for cls, row in zip(vocab, report["confusion_matrix"]["rows_actual_cols_predicted"], strict=True):
        lines.append(f"{cls:<{width}}  " + "  ".join(f"{n:>8}" for n in row))
    if report["detector"] is None:
        lines += ["", "no unfamiliar-image detector: this model answers with one of its classes for any photo"]
        return "\n".join(lines)

    def rows(title: str, overall: dict, groups: dict) -> list[str]:
        out = ["", f"{title:<24} {'flagged':>8} {'of':>6} {'rate':>7}"]
        for name, r in [*groups.items(), ("all", overall)]:
            out.append(f"{name:<24} {r['flagged']:>8} {r['images']:>6} {r['rate']:>7.1%}")
        return out

    known = report["flagged_known"]
    lines += rows("unfamiliar? (real class)", known["overall"], known["per_class"])
    if report.get("flagged_unfamiliar"):
        other = report["flagged_unfamiliar"]
        lines += rows("unfamiliar? (no class)", other["overall"], other["per_folder"])
    return "\n".join(lines)


# --- Command line --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder with one sub-folder of photos per class")
    parser.add_argument("--model", type=Path, default=Path("models/export.pkl"), help="the fastai export")
    parser.add_argument("--unfamiliar", type=Path, metavar="OTHER", help="folder of photos that belong to no class")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    return parser.parse_args(argv)


def load_model(model_path: Path, threads: int,
               features: bool | None = None) -> tuple[Predictor, Detector | None, LoadedModel]:
    """The predictor and detector the server would build for this export (its self-check included),
    and the learner. `features=True` makes the predictor output the pooled features even when the
    export has no detector (to compare detectors on it)."""
    from app.model_store import ModelFile, ModelLoadError, check_model_file, load_learner_from, read_model_card
    from app.predictor import build_predictor
    from app.startup import load_detector

    try:
        file = ModelFile(model_path, check_model_file(model_path, None), read_model_card(model_path))
        detector = load_detector(file)
        model = load_learner_from(file)
        features = detector is not None if features is None else features
        predictor = build_predictor(model.learn, file.path, file.sha256, threads, features=features)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    return predictor, detector, model


def main(argv: list[str] | None = None) -> int:
    import os

    from app.logs import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        predictor, detector, model = load_model(args.model, args.threads or os.cpu_count() or 1)
        report = evaluate(predictor, detector, model.vocab, args.data, args.unfamiliar)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
