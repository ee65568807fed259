"""Classify many photos from the command line, exactly as the server answers each one.

    python -m app.predict PATH... [--model models/export.pkl] [--csv FILE | --jsonl] [--batch 16]

Every photo in the files and folders given (folders searched below, as `app.evaluate` does), through
the server's decoding, preprocessing, compiled model and unfamiliar-image detector, in batches. A
bundle (`--model DIR`) is served without torch or fastai, as the slim image serves it. Prints one
line a photo (path, top class, its probability, `unfamiliar` when flagged); `--jsonl` prints
instead, for each photo, `{"path": ...}` with the answer `POST /upload` gives (or `"error"`), and
`--csv FILE` writes one row a photo with every class's probability. A photo that cannot be read is
listed with its reason and the run goes on; the exit status is then 1 (0 when every photo was
classified, 2 with a one-line message on bad input). A progress count goes to a terminal's stderr
only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from app.building.cli import UsageError, add_threads, parser, run_command, threads_or_all
from app.building.datasets import image_files
from app.building.evaluate import load_model
from app.core.bundle import is_bundle, load_bundle
from app.core.detector import Detector
from app.core.errors import DomainError
from app.core.model_file import ModelLoadError
from app.core.prediction import infer_batch, prepare_image
from app.core.runner import Predictor


@dataclass(frozen=True)
class Answer:
    path: Path
    body: dict[str, Any] | None  # what POST /upload answers for this photo
    error: dict[str, str] | None = None  # {"code", "message"} when it could not be classified


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m app.predict", __doc__)
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="photos, and folders of photos")
    p.add_argument("--model", type=Path, default=Path("models/export.pkl"), help="an export, or a bundle folder")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", type=Path, metavar="FILE", help="write one row a photo to FILE")
    out.add_argument("--jsonl", action="store_true", help="print one JSON object a photo")
    p.add_argument("--batch", type=int, default=16, help="photos in one forward pass")
    add_threads(p, "inference")
    return p.parse_args(argv)


def photos(paths: list[Path]) -> list[Path]:
    """The files named, and the photos below the folders named, in the order given."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += image_files(path, recursive=True)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return found


def load(model: Path, threads: int) -> tuple[Predictor, Detector | None, list[str]]:
    """The predictor, detector and classes the server would serve `model` with."""
    try:
        if is_bundle(model):
            bundle = load_bundle(model, threads)
            return bundle.predictor, bundle.detector, bundle.manifest.classes
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    predictor, detector, loaded = load_model(model, threads, single_label=False)
    return predictor, detector, loaded.vocab


def classify(files: list[Path], predictor: Predictor, detector: Detector | None, vocab: list[str],
             batch: int, threads: int) -> Iterator[Answer]:
    """Each file's answer, in the order given, a batch of prepared photos (of one input shape) at a
    time; a file that cannot be read waits for its place in the order."""
    pending: list[tuple[Path, np.ndarray | dict[str, str]]] = []

    def run() -> Iterator[Answer]:
        arrays = [item for _, item in pending if isinstance(item, np.ndarray)]
        outcomes = iter(infer_batch(predictor, detector, np.stack(arrays)) if arrays else [])
        for path, item in pending:
            if isinstance(item, np.ndarray):
                yield Answer(path, next(outcomes).to_json(vocab, predictor.threshold))
            else:
                yield Answer(path, None, item)
        pending.clear()

    def prepared(path: Path) -> np.ndarray | dict[str, str]:
        try:
            return prepare_image(path.read_bytes(), predictor)
        except DomainError as exc:
            return {"code": exc.code, "message": exc.message}
        except OSError as exc:
            return {"code": "unreadable", "message": exc.strerror or str(exc)}

    # Decoding is most of the work and Pillow releases the GIL: photos are decoded on `threads`
    # threads, a few batches ahead, so that memory stays bounded however many photos there are.
    with ThreadPoolExecutor(threads) as pool:
        ahead = batch * 4
        for start in range(0, len(files), ahead):
            chunk = files[start:start + ahead]
            for path, item in zip(chunk, pool.map(prepared, chunk), strict=True):
                arrays = [a for _, a in pending if isinstance(a, np.ndarray)]
                if isinstance(item, np.ndarray) and arrays and (len(arrays) == batch or item.shape != arrays[0].shape):
                    yield from run()
                pending.append((path, item))
    if pending:
        yield from run()


def line(answer: Answer) -> str:
    if answer.body is None:
        assert answer.error is not None
        return f"{answer.path}\terror\t{answer.error['message']}"
    label, probability = answer.body["predictions"][0]
    flag = "\tunfamiliar" if answer.body.get("unfamiliar") else ""
    return f"{answer.path}\t{label}\t{probability:.4f}{flag}"


def write_rows(answers: Iterator[Answer], vocab: list[str], out: TextIO) -> Iterator[Answer]:
    writer = csv.writer(out)
    writer.writerow(["path", "label", "probability", "unfamiliar", *vocab, "error"])
    for answer in answers:
        if answer.body is None:
            assert answer.error is not None
            writer.writerow([answer.path, "", "", "", *[""] * len(vocab), answer.error["message"]])
        else:
            probs = dict(answer.body["predictions"])
            label, probability = answer.body["predictions"][0]
            writer.writerow([answer.path, label, f"{probability:.6f}", answer.body.get("unfamiliar", ""),
                             *[f"{probs[c]:.6f}" for c in vocab], ""])
        yield answer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        if args.batch < 1:
            raise UsageError("--batch must be at least 1")
        files = photos(args.paths)
        if not files:
            raise UsageError(f"no photos in {', '.join(map(str, args.paths))}")
        threads = threads_or_all(args.threads)
        predictor, detector, vocab = load(args.model, threads)
        answers = classify(files, predictor, detector, vocab, args.batch, threads)
        csv_file = args.csv.open("w", newline="") if args.csv else None
        if csv_file is not None:
            answers = write_rows(answers, vocab, csv_file)
        progress = sys.stderr.isatty()
        failed, start = 0, time.perf_counter()
        try:
            for done, answer in enumerate(answers, 1):
                failed += answer.body is None
                if args.jsonl:
                    print(json.dumps({"path": str(answer.path), **(answer.body or {"error": answer.error})}))
                elif csv_file is None or answer.body is None:
                    print(line(answer), file=sys.stdout if csv_file is None else sys.stderr)
                if progress:
                    print(f"\r{done}/{len(files)} photos", end="", file=sys.stderr, flush=True)
        finally:
            if csv_file is not None:
                csv_file.close()
        seconds = time.perf_counter() - start
        if progress:
            print(file=sys.stderr)
        print(f"{len(files) - failed} of {len(files)} photos classified in {seconds:.1f} s "
              f"({len(files) / seconds:.1f} photos/s){f'; {failed} could not be read' if failed else ''}",
              file=sys.stderr)
        return 1 if failed else 0

    return run_command(run)
