"""The default model on photos from sources it never trained on, and detector alternatives side by side.

    python -m bench.sources [--model models] [--write-card]

Every photo of `../shared/data/bears`, `../shared/data/in-context` and `../shared/data/not-bears`
goes through the model's FP32 bundle once (its probabilities and pooled features). Then:

1. the recipe's figures on a random split (the model card's) against whole sources left out
   (`app.building.source_split`, folds of the bears' SOURCES.csv `repo`), and the model itself on
   the in-context photos, whose 44 sources no training photo came from, by class and setting;
2. unfamiliar-image detectors fitted as `app.train` fits them (references: the training split;
   thresholds: the validation split, or with the training photos' out-of-fold scores), with other
   k, keep, or in-context photos added to the references (those of the other in-context sources
   only, in folds by source, so no photo is measured against its own source): each row's flagged
   rates on the in-context photos by class, teddies at home, their photos without a bear, and
   `not-bears`. Nothing here sets the shipped model's thresholds. The last row is a detector over
   several views: each photo's most familiar of five (the whole photo and four corner crops of
   two thirds of it), so that a teddy that fills a small part of a scene can still be found.

`--write-card` records the figures of 1 in the model card as `app.train` now does for data with a
SOURCES.csv (`source_split`, `train_sources`), for a model trained before it did.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from app.building.datasets import class_files, image_files, split
from app.building.linear_head import FOLDS, stratified_folds
from app.building.measure import predict_files
from app.building.source_split import read_sources, source_split_figures, sources_of
from app.core.bundle import load_bundle
from app.core.detector import Detector
from bench.servers import ROOT

SHARED = ROOT.parent / "shared" / "data"


def in_context_table() -> dict[Path, dict[str, str]]:
    with (SHARED / "in-context" / "SOURCES.csv").open(newline="") as f:
        return {(SHARED / "in-context" / row["file"]).resolve(): row for row in csv.DictReader(f)}


def view_features(bundle: Any, files: list[Path]) -> np.ndarray:
    """(photos, 5, d): the pooled features of each photo whole and of its four corner crops of 2/3."""
    from app.core.images import decode_image

    out = []
    for path in files:
        image = decode_image(path.read_bytes())
        w, h = image.size
        cw, ch = round(w * 2 / 3), round(h * 2 / 3)
        crops = [image] + [image.crop((x, y, x + cw, y + ch)) for x in (0, w - cw) for y in (0, h - ch)]
        out.append(bundle.predictor.infer(np.stack([bundle.predictor.prepare(c) for c in crops]))[1])
    return np.stack(out)


def views_row(bundle: Any, train: Any, valid: Any, ctx: Any, not_bears: Any, vocab: list[str], k: int,
              keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Flags of the in-context and not-bears photos by the most familiar of five views, each class's
    threshold set on the validation photos' most familiar view (keep `keep`)."""
    from app.core.detector import class_thresholds, knn_similarity, l2_normalised, threshold_keeping

    reference = l2_normalised(train.features)

    def best(files: list[Path]) -> np.ndarray:
        views = view_features(bundle, files)
        scores = knn_similarity(reference, l2_normalised(views.reshape(-1, views.shape[-1])), k)
        return scores.reshape(len(files), -1).max(axis=1)

    valid_scores, valid_predicted = best(valid.files), valid.probs.argmax(1)
    overall = threshold_keeping(valid_scores, keep)
    limits = np.asarray(class_thresholds(valid_scores, valid_predicted, len(vocab), keep, overall), np.float32)
    return (best(ctx.files) < limits[ctx.probs.argmax(1)],
            best(not_bears.files) < limits[not_bears.probs.argmax(1)])


def rate(flags: np.ndarray) -> str:
    return f"{flags.mean():.1%} ({int(flags.sum())}/{len(flags)})" if len(flags) else "-"


def detector_rows(bundle: Any, vocab: list[str], train: Any, valid: Any, ctx: Any, ctx_rows: list[dict[str, str]],
                  not_bears: Any, k: int, keep: float) -> list[str]:
    from sklearn.model_selection import GroupKFold

    ctx_labels = np.array([vocab.index(r["class"]) if r["class"] in vocab else -1 for r in ctx_rows])
    ctx_predicted = ctx.probs.argmax(1)
    home = np.array([r["setting"] == "home" for r in ctx_rows])
    groups = np.array([r["repo"] for r in ctx_rows])
    train_labels = np.array([vocab.index(p.parent.name) for p in train.files])
    folds = stratified_folds(train_labels, FOLDS, seed=42)
    valid_predicted, train_predicted = valid.probs.argmax(1), train.probs.argmax(1)

    def fitted(kk: int, kp: float, oof: bool, extra: np.ndarray | None = None) -> Detector:
        if extra is not None:  # thresholds from the validation split, against the enlarged references
            reference = np.concatenate([train.features, extra])
            return Detector.fit("", reference, valid.features, valid_predicted, len(vocab), kk, kp)
        args = (folds, train_predicted) if oof else (None, None)
        return Detector.fit("", train.features, valid.features, valid_predicted, len(vocab), kk, kp, *args)

    variants: dict[str, Any] = {
        f"as app.train fits it (k={k}, keep {keep:.0%}, thresholds: validation split)": dict(kk=k, kp=keep, oof=False),
        "thresholds: validation split + out-of-fold training photos": dict(kk=k, kp=keep, oof=True),
        "keep 99%": dict(kk=k, kp=0.99, oof=False),
        "k=1": dict(kk=1, kp=keep, oof=False),
        "k=10": dict(kk=10, kp=keep, oof=False),
    }
    lines = ["| detector | black | grizzly | teddys | teddys at home | in-context, no bear | not-bears |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, flags: np.ndarray, not_bear_flags: np.ndarray) -> None:
        cells = [rate(flags[ctx_labels == i]) for i in range(len(vocab))]
        teddys = vocab.index("teddys")
        lines.append(f"| {name} | {' | '.join(cells)} | {rate(flags[(ctx_labels == teddys) & home])} | "
                     f"{rate(flags[ctx_labels == -1])} | {rate(not_bear_flags)} |")

    for name, options in variants.items():
        detector = fitted(**options)
        row(name, detector.unfamiliar(ctx.features, ctx_predicted),
            detector.unfamiliar(not_bears.features, not_bears.probs.argmax(1)))
    # In-context photos of the classes from the other sources join the references, fold by fold.
    flags = np.zeros(len(ctx_rows), dtype=bool)
    not_bear_flags = np.zeros(len(not_bears.files), dtype=bool)
    splitter = GroupKFold(5)
    for fold, (others, held) in enumerate(splitter.split(ctx.features, ctx_labels, groups)):
        extra = ctx.features[others][ctx_labels[others] >= 0]
        detector = fitted(k, keep, False, extra)
        flags[held] = detector.unfamiliar(ctx.features[held], ctx_predicted[held])
        if fold == 0:
            not_bear_flags = detector.unfamiliar(not_bears.features, not_bears.probs.argmax(1))
    row("+ in-context photos of the classes from other sources in the references (5 folds by source)", flags,
        not_bear_flags)
    row("the most familiar of 5 views (whole, 4 corner crops of 2/3), thresholds: validation split",
        *views_row(bundle, train, valid, ctx, not_bears, vocab, k, keep))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models")
    parser.add_argument("--write-card", action="store_true", help="record the figures by source in the model card")
    args = parser.parse_args()
    card = json.loads((args.model / "model-card.json").read_text())
    bundle = load_bundle(args.model / "bundle", os.cpu_count() or 1)
    vocab = bundle.manifest.classes
    bears = SHARED / "bears"
    files = class_files(bears, vocab)
    train_files, valid_files = split(files, card["valid_pct"], card["seed"])
    run = {name: predict_files(bundle.predictor, bundle.detector, chosen) for name, chosen in
           (("train", train_files), ("valid", valid_files),
            ("ctx", image_files(SHARED / "in-context", recursive=True)),
            ("not_bears", image_files(SHARED / "not-bears", recursive=True)))}
    # Every bear photo, from the two splits' outputs, in the folders' order (which sets the folds).
    row_of = {p: i for i, p in enumerate([*run["train"].files, *run["valid"].files])}
    position = {p: i for i, p in enumerate(files)}
    every_file = sorted(row_of, key=position.__getitem__)
    features = np.concatenate([run["train"].features, run["valid"].features])[[row_of[p] for p in every_file]]
    labels = np.array([vocab.index(p.parent.name) for p in every_file])
    groups = sources_of(every_file, read_sources(bears))
    assert groups is not None, "every bear photo needs its source in SOURCES.csv"
    by_source = source_split_figures(features, labels, every_file, groups, vocab, card["head"]["C"],
                                     seed=card["seed"])
    lines = [f"# The default model on new sources ({args.model})", "",
             "| photos | sources | accuracy | " + " | ".join(f"{c} flagged" for c in vocab) + " |",
             "|---|---:|---:|" + "---:|" * len(vocab)]
    valid_flags = card["detector"]["class_valid_false_flag_rates"]
    lines.append(f"| random split (validation, {card['valid_images']} photos; the card's) | "
                 f"{len(set(groups))} (the same) | {card['valid_accuracy']:.2%} | "
                 + " | ".join(f"{r:.1%} (as predicted)" for r in valid_flags) + " |")
    lines.append(f"| sources left out (bears, {by_source['photos']} photos) | {by_source['sources']} | "
                 f"{by_source['accuracy']:.2%} | "
                 + " | ".join(f"{by_source['per_class'][c]['flagged']:.1%}" for c in vocab) + " |")
    table = in_context_table()
    ctx = run["ctx"]
    ctx_rows = [table[p.resolve()] for p in ctx.files]
    known = np.array([r["class"] in vocab for r in ctx_rows])
    targets = np.array([vocab.index(r["class"]) if r["class"] in vocab else -1 for r in ctx_rows])
    predicted = ctx.probs.argmax(1)
    lines.append(f"| in-context, the model itself ({int(known.sum())} photos) | "
                 f"{len({r['repo'] for r, k in zip(ctx_rows, known, strict=True) if k})} | "
                 f"{(predicted[known] == targets[known]).mean():.2%} | "
                 + " | ".join(rate(ctx.unfamiliar[targets == i]) for i in range(len(vocab))) + " |")
    lines += ["", "Errors on sources left out: " + "; ".join(
        f"{e['file']} ({e['source']}) {e['actual']} -> {e['predicted']}" for e in by_source["errors"]), ""]
    settings = sorted({r["setting"] for r in ctx_rows})
    lines += ["| in-context setting | photos | wrong | flagged |", "|---|---:|---:|---:|"]
    for setting in settings:
        mine = np.array([r["setting"] == setting for r in ctx_rows]) & known
        if mine.any():
            lines.append(f"| {setting} | {int(mine.sum())} | {int((predicted[mine] != targets[mine]).sum())} | "
                         f"{rate(ctx.unfamiliar[mine])} |")
    lines += ["", *detector_rows(bundle, vocab, run["train"], run["valid"], ctx, ctx_rows, run["not_bears"],
                                 card["detector"]["k"], 0.97)]
    print("\n".join(lines))
    if args.write_card:
        trained_on = sources_of(run["train"].files, read_sources(bears))
        card_path = args.model / "model-card.json"
        card = {**card, "source_split": {**by_source, "measured_by": "python -m bench.sources --write-card"},
                "train_sources": sorted(set(trained_on or []))}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
