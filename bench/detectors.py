"""Compare unfamiliar-image detectors on a trained model: how the default method was chosen.

    python -m bench.detectors [--model models/export.pkl] [--data ../shared/data/bears]
                              [--unfamiliar ../shared/data/not-bears] [--json FILE]

Rebuilds the model's training/validation split (the same seed and share as `app.train`), runs
every photo through the server's preprocessing and the model, and scores each method the same way:
the threshold keeps 97% of the validation photos familiar (set on validation scores only), then
the table shows how many photos of no class each method flags, per category. The photos of no
class choose the method; they never set a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.building.datasets import find_classes, image_files, split
from app.building.evaluate import load_model
from app.building.measure import predict_files
from app.core.detector import knn_similarity, l2_normalised, threshold_keeping

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
KEEP = 0.97

Scorer = Callable[[np.ndarray], np.ndarray]  # features of some photos -> scores, higher = more familiar


def knn(reference: np.ndarray, k: int) -> Scorer:
    ref = l2_normalised(reference)
    return lambda x: knn_similarity(ref, l2_normalised(x), k)


def mahalanobis(reference: np.ndarray, labels: np.ndarray) -> Scorer:
    """Class means with one shared Ledoit-Wolf-shrunk covariance (Lee et al. 2018, without input
    perturbation); the score is minus the smallest distance to a class mean."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(labels)
    means = np.stack([reference[labels == c].mean(axis=0) for c in classes])
    centred = reference - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf().fit(centred).precision_

    def score(x: np.ndarray) -> np.ndarray:
        d = x[:, None, :] - means[None]
        return -np.einsum("ncd,de,nce->nc", d, precision, d).min(axis=1)

    return score


def main(argv: list[str] | None = None) -> int:
    import torch

    from app.core.logs import quiet_library_warnings

    quiet_library_warnings()
    parser = argparse.ArgumentParser(prog="python -m bench.detectors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "export.pkl")
    parser.add_argument("--data", type=Path, default=SHARED / "bears")
    parser.add_argument("--unfamiliar", type=Path, default=SHARED / "not-bears")
    parser.add_argument("--valid-pct", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    predictor, _, model = load_model(args.model, os.cpu_count() or 1, with_features=True)
    vocab = model.vocab
    files = [f for cls in find_classes(args.data) for f in image_files(args.data / cls)]
    train_files, valid_files = split(files, args.valid_pct, args.seed)
    other_files = image_files(args.unfamiliar, recursive=True)
    # The torch model behind the predictor gives logits and the head's penultimate layer too.
    from app.building.measure import Outputs
    from app.learner.features import penultimate, with_features

    wrapper = with_features(model.learn.model)

    def outputs(paths: list[Path]) -> tuple[Outputs, np.ndarray, np.ndarray]:
        out = predict_files(predictor, None, paths)
        with torch.inference_mode():
            pooled = torch.from_numpy(out.features)
            logits = wrapper.to_logits(pooled).numpy()
            hidden = penultimate(wrapper, pooled).numpy()
        return out, logits, hidden

    tr, tr_logits, tr_hidden = outputs(train_files)
    va, va_logits, va_hidden = outputs(valid_files)
    ot, ot_logits, ot_hidden = outputs(other_files)
    tr_labels = np.array([vocab.index(p.parent.name) for p in tr.files])

    def softmax_max(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).max(axis=1)

    def energy(logits: np.ndarray) -> np.ndarray:
        m = logits.max(axis=1)
        return m + np.log(np.exp(logits - m[:, None]).sum(axis=1))

    # (name, valid scores, other scores)
    methods: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("max-softmax", softmax_max(va_logits), softmax_max(ot_logits)),
        ("energy", energy(va_logits), energy(ot_logits)),
    ]
    for k in (1, 5, 10, 20, 50):
        s = knn(tr.features, k)
        methods.append((f"k-NN pooled, k={k}", s(va.features), s(ot.features)))
    s = knn(tr_hidden, 5)
    methods.append(("k-NN penultimate, k=5", s(va_hidden), s(ot_hidden)))
    s = mahalanobis(tr.features, tr_labels)
    methods.append(("Mahalanobis pooled (Ledoit-Wolf)", s(va.features), s(ot.features)))
    s = mahalanobis(tr_hidden, tr_labels)
    methods.append(("Mahalanobis penultimate (Ledoit-Wolf)", s(va_hidden), s(ot_hidden)))

    categories = np.array([p.relative_to(args.unfamiliar).parts[0] for p in ot.files])
    names = sorted(set(categories.tolist()))
    header = ["method", "valid flagged", "no-class flagged", *names]
    rows, report = [], []
    for name, valid_scores, other_scores in methods:
        threshold = threshold_keeping(valid_scores, KEEP)
        flagged = other_scores < threshold
        per = {c: float(flagged[categories == c].mean()) for c in names}
        valid_flagged = float((valid_scores < threshold).mean())
        report.append({"method": name, "threshold": threshold, "valid_flagged": valid_flagged,
                       "other_flagged": float(flagged.mean()), "per_category": per})
        rows.append([name, f"{valid_flagged:.1%}", f"{flagged.mean():.1%}",
                     *(f"{per[c]:.0%}" for c in names)])
    print(f"{len(tr.files)} training, {len(va.files)} validation, {len(ot.files)} photos of no class")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
