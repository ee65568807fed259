"""Compare threshold rules for the unfamiliar-image detector, class by class: how the per-class rule
was chosen.

    python -m bench.detector_rules [--model models/export.pkl] [--data ../shared/data/bears]
                                   [--unfamiliar ../shared/data/not-bears] [--halves 200]

Rebuilds the model's training/validation split, runs every photo the server's way, and for each
rule reports the validation photos flagged (per actual class), the out-of-sample estimate (the
rule's thresholds set on a random half of the validation photos, measured on the other half,
averaged over `--halves` random halves, per class), and the photos of no class flagged. Thresholds
are only ever set on validation photos; the photos of no class only compare the rules.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.building.datasets import find_classes, image_files, split
from app.building.evaluate import load_model
from app.building.measure import predict_files
from app.core.detector import DEFAULT_K, class_thresholds, knn_similarity, l2_normalised, threshold_keeping

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

# A rule: (validation scores, validation predictions, keep, n classes) -> thresholds per class.
Rule = Callable[[np.ndarray, np.ndarray, float, int], np.ndarray]


def one_threshold(scores: np.ndarray, predicted: np.ndarray, keep: float, n: int) -> np.ndarray:
    return np.full(n, threshold_keeping(scores, keep), np.float32)


def per_class(scores: np.ndarray, predicted: np.ndarray, keep: float, n: int) -> np.ndarray:
    return np.asarray(class_thresholds(scores, predicted, n, keep, threshold_keeping(scores, keep)), np.float32)


def class_conditional_scores(reference: np.ndarray, labels: np.ndarray, features: np.ndarray,
                             predicted: np.ndarray, k: int) -> np.ndarray:
    """Similarity to the k-th nearest training photo of the predicted class only."""
    queries = l2_normalised(features)
    out = np.empty(len(features), np.float32)
    for c in np.unique(predicted):
        rows = predicted == c
        out[rows] = knn_similarity(reference[labels == c], queries[rows], k)
    return out


def main(argv: list[str] | None = None) -> int:
    from app.core.logs import quiet_library_warnings

    quiet_library_warnings()
    parser = argparse.ArgumentParser(prog="python -m bench.detector_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "export.pkl")
    parser.add_argument("--data", type=Path, default=SHARED / "bears")
    parser.add_argument("--unfamiliar", type=Path, default=SHARED / "not-bears")
    parser.add_argument("--valid-pct", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--halves", type=int, default=200)
    args = parser.parse_args(argv)

    predictor, _, model = load_model(args.model, os.cpu_count() or 1, with_features=True)
    vocab, n = model.vocab, len(model.vocab)
    files = [f for cls in find_classes(args.data) for f in image_files(args.data / cls)]
    train_files, valid_files = split(files, args.valid_pct, args.seed)
    tr, va, ot = (predict_files(predictor, None, paths)
                  for paths in (train_files, valid_files, image_files(args.unfamiliar, recursive=True)))
    reference = l2_normalised(tr.features)
    tr_labels = np.array([vocab.index(p.parent.name) for p in tr.files])
    va_actual = np.array([vocab.index(p.parent.name) for p in va.files])
    va_pred, ot_pred = va.probs.argmax(axis=1), ot.probs.argmax(axis=1)

    def knn_scores(features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return knn_similarity(reference, l2_normalised(features), DEFAULT_K)

    def conditional(features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return class_conditional_scores(reference, tr_labels, features, predicted, DEFAULT_K)

    rng = np.random.default_rng(0)
    halves = [rng.permutation(len(va_pred)) for _ in range(args.halves)]
    print(f"{len(tr.files)} training, {len(va.files)} validation, {len(ot.files)} photos of no class; "
          f"accuracy {float((va_pred == va_actual).mean()):.2%}")
    header = ["rule", "keep", *(f"valid {c}" for c in vocab), *(f"new {c} (est.)" for c in vocab), "no-class flagged"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, scorer, rule in [("one threshold, k-NN", knn_scores, one_threshold),
                               ("per predicted class, k-NN", knn_scores, per_class),
                               ("per predicted class, class-conditional k-NN", conditional, per_class)]:
        va_scores, ot_scores = scorer(va.features, va_pred), scorer(ot.features, ot_pred)
        for keep in (0.97, 0.98):
            thresholds = rule(va_scores, va_pred, keep, n)
            flagged = va_scores < thresholds[va_pred]
            valid_rates = [flagged[va_actual == c].mean() for c in range(n)]
            estimates = np.zeros(n)
            for order in halves:
                fit, held = order[: len(order) // 2], order[len(order) // 2:]
                t = rule(va_scores[fit], va_pred[fit], keep, n)
                held_flagged = va_scores[held] < t[va_pred[held]]
                estimates += [held_flagged[va_actual[held] == c].mean() for c in range(n)]
            estimates /= len(halves)
            other = float((ot_scores < thresholds[ot_pred]).mean())
            print(f"| {name} | {keep:.0%} | " + " | ".join(f"{r:.1%}" for r in valid_rates) + " | "
                  + " | ".join(f"{e:.1%}" for e in estimates) + f" | {other:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
