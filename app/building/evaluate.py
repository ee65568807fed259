"""Evaluate a model the way the server runs it, on photos it never saw.

    python -m app.evaluate DATA [--model models/export.pkl] [--unfamiliar OTHER] [--json FILE]
    python -m app.evaluate DATA --model NEW --compare OLD [--unfamiliar OTHER] [--sheet FILE.png]

DATA holds one sub-folder of photos per class (a subset of the model's classes); OTHER, photos that
belong to no class, in any sub-folders (cats/, cars/, ...). Every photo goes through the server's
decoding, preprocessing, compiled model and unfamiliar-image detector. Prints accuracy, the
confusion matrix and how many photos the detector flags (per class of DATA, per sub-folder of
OTHER); where DATA has a SOURCES.csv naming each photo's source (`repo`), the figures on photos of
sources the model never trained on (its card's `train_sources`) are given apart; `--json FILE`
writes the same figures. With `--compare OLD`, both models run on the same
photos and are set side by side (`app.building.compare`): the exit status is 0 when the new model
is as good as the old one, 1 when it is not. Exits 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.building.cli import UsageError, add_threads, parser, run_command, threads_or_all
from app.building.compare import compare, contact_sheet, format_comparison
from app.building.datasets import find_classes, loose_photos_hint
from app.building.measure import evaluate, unfamiliar_files
from app.building.source_split import by_training_source, read_sources
from app.core.detector import Detector, load_detector
from app.core.model_file import ModelLoadError, open_model_file
from app.core.runner import Predictor, onnx_cache_path
from app.learner.compile import build_predictor
from app.learner.loading import LoadedModel, load_learner_from


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
    lines += source_lines(report.get("by_source"))
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


def source_lines(by_source: dict[str, Any] | None) -> list[str]:
    if by_source is None:
        return []
    if not by_source["known"]:
        return ["", f"by source: {by_source['note']}"]
    out = ["", f"{'photos of':<24} {'photos':>6} {'sources':>8} {'accuracy':>9} {'flagged':>8}"]
    for name, part in by_source.items():
        if name != "known":
            flagged = "-" if part["flagged"] is None else f"{part['flagged']:.1%}"
            out.append(f"{name:<24} {part['photos']:>6} {part['sources']:>8} {part['accuracy']:>9.2%} {flagged:>8}")
    return out


# --- Command line --------------------------------------------------------------------------------


NOT_AS_GOOD = 1  # the exit status when --model is not as good as --compare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m app.evaluate", __doc__)
    p.add_argument("data", type=Path, help="folder with one sub-folder of photos per class")
    p.add_argument("--model", type=Path, default=Path("models/export.pkl"), help="the fastai export")
    p.add_argument("--unfamiliar", type=Path, metavar="OTHER", help="folder of photos that belong to no class")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--compare", type=Path, metavar="OLD",
                   help="compare --model with this export (the one in service); exit 1 if it is not as good")
    p.add_argument("--sheet", type=Path, metavar="FILE.png",
                   help="with --compare: draw the photos the two models answer differently")
    p.add_argument("--code", type=Path, metavar="FILE.py",
                   help="a Python file defining the functions the exports refer to (as MODEL_CODE does)")
    add_threads(p, "inference")
    return p.parse_args(argv)


def load_model(model_path: Path, threads: int, with_features: bool | None = None,
               code: Path | None = None, single_label: bool = True) -> tuple[Predictor, Detector | None, LoadedModel]:
    """The predictor and detector the server would build for this export (its self-check included),
    and the learner. `with_features=True` makes the predictor output the pooled features even when
    the export has no detector (to compare detectors on it); `single_label=False` also takes a
    multi-label model, which the figures of app.evaluate do not describe."""
    if not model_path.is_file():
        what = "is a folder, not an export" if model_path.is_dir() else "not found"
        raise UsageError(f"model {model_path} {what}: pass --model PATH to an export.pkl")
    try:
        file = open_model_file(model_path)
        detector = load_detector(file)
        model = load_learner_from(file, code)
        features = detector is not None if with_features is None else with_features
        predictor = build_predictor(model.learn, threads, "auto", features,
                                    onnx_cache_path(file.path, file.sha256, features))
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    if single_label and predictor.threshold is not None:
        raise UsageError(f"{model_path} is a multi-label model: app.evaluate measures single-label classifiers "
                         "(one class folder per photo)")
    return predictor, detector, model


def check_folders(data: Path, unfamiliar: Path | None) -> None:
    """Bad folders are reported at once, before the model takes seconds to load."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    if not find_classes(data):
        raise UsageError(f"no class folders in {data}: it needs one sub-folder of photos per class"
                         f"{loose_photos_hint(data)}")
    if unfamiliar is not None:
        unfamiliar_files(unfamiliar)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def report_on(model_path: Path) -> dict[str, Any]:
        predictor, detector, model = load_model(model_path, threads_or_all(args.threads), code=args.code)
        report = evaluate(predictor, detector, model.vocab, args.data, args.unfamiliar)
        sources = read_sources(args.data)
        if sources:  # the data says where its photos come from: figures on new sources apart
            report["by_source"] = by_training_source(report["photos"], sources,
                                                     (model.file.card or {}).get("train_sources"))
        return report

    def run() -> int:
        if args.sheet is not None and args.compare is None:
            raise UsageError("--sheet draws the photos two models disagree on: give --compare OLD too")
        check_folders(args.data, args.unfamiliar)
        if args.compare is None:
            report = report_on(args.model)
            print(format_report(report))
        else:
            report = compare(report_on(args.model), report_on(args.compare))
            print(format_comparison(report))
            if args.sheet is not None:
                drawn = contact_sheet(report["disagreements"], args.sheet)
                print(f"{drawn} of the photos answered differently drawn in {args.sheet}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if args.compare is None or report["as_good"] else NOT_AS_GOOD

    return run_command(run)
