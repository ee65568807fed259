"""Train an image classifier the fast.ai lesson 2 way and export it for the server.

    python -m app.train DATA [--urls CLASS=FILE ...] [--arch efficientnet_lite0] [--out trained]

DATA holds one folder per class. With `--urls`, images listed in text files (one URL a line, as
saved from an image search) are downloaded into those folders first. Every image is checked the
way the server decodes photos before training; files it refuses are moved to DATA/_rejected/,
never deleted.

After training, a temperature fitted on the validation split is folded into the last layer (when
it makes the probabilities better calibrated), and an unfamiliar-image detector is fitted on the
model's features of the training photos (`app.core.detector`). Validation figures are measured the
way the server runs the model.

Writes OUT/export.pkl (`learn.export()`), OUT/export.detector.npz, OUT/model-card.json,
OUT/confusion-matrix.png, OUT/top-losses.png and OUT/bundle/ (the checked bundle that serves
without torch, `app.compile`); with `--int8`, also OUT/bundle-int8/ (`app.building.int8`:
calibrated on the training split, its agreement with the FP32 model measured on the validation
split; exit 2 after everything else is written if it misses its contract). An existing export in
OUT is replaced only with `--overwrite`. Exits 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from app.building.cli import USAGE_ERROR, UsageError, parser, run_command
from app.building.datasets import REJECTED_DIR, class_files, image_files, require_classes
from app.building.download import DownloadReport, download_images, parse_url_specs
from app.building.finish import BUNDLE_NAME, CARD_NAME, EXPORT_NAME, INT8_BUNDLE_NAME, complete
from app.building.imagenet_test import CHOICES as IMAGENET_CHOICES
from app.building.imagenet_test import SMALL_SET, wanted, why_not
from app.building.int8 import ContractNotMet, agreement_summary, quantize_bundle, split_description
from app.building.linear_head import fit_linear_head
from app.building.measure import unfamiliar_files
from app.building.outlier_exposure import KEEP as OUTLIER_KEEP
from app.building.recipe import (
    ARCHITECTURES,
    HEADS,
    OFFLINE_PRETRAINED,
    architectures,
    fit,
    make_dataloaders,
    new_learner,
)
from app.core.detector import DEFAULT_K, DEFAULT_KEEP, detector_path
from app.core.imagenet_test import TOP
from app.core.images import ImageError, decode_image

DEFAULT_OUT = Path("trained")


def verify_images(data: Path, classes: list[str]) -> list[tuple[Path, str]]:
    """Move files the server would refuse (they do not decode, or are of a format it does not read)
    to DATA/_rejected/CLASS/; return where each went and why."""
    rejected = []
    for cls in classes:
        for path in image_files(data / cls):
            try:
                decode_image(path.read_bytes())
                continue
            except ImageError as exc:
                reason = exc.message
            dest = data / REJECTED_DIR / cls / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
            rejected.append((dest, reason))
    return rejected


def check_out(out: Path, overwrite: bool) -> None:
    """Before hours of training: OUT must be a folder this process can write in (or create), and
    must not hold an export that would be replaced unasked (the shipped default model lives in
    models/). Nothing is created here: bad data is still reported first, leaving no empty OUT."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if (out / EXPORT_NAME).exists() and not overwrite:
        raise UsageError(f"{out / EXPORT_NAME} already exists: pass --overwrite to replace that model, "
                         "or choose another --out")
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser("python -m app.train", __doc__)
    p.add_argument("data", type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("--urls", action="append", default=[], metavar="CLASS=FILE",
                   help="download the image URLs in FILE into DATA/CLASS first (repeatable)")
    p.add_argument("--max-per-class", type=int, default=200, help="most URLs downloaded per class")
    p.add_argument("--arch", default="efficientnet_lite0", choices=ARCHITECTURES, help="backbone")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help=f"start from ImageNet weights (offline for {', '.join(OFFLINE_PRETRAINED)}; "
                        "the resnets download theirs)")
    # Defaults: what measured best on the bear photos (README, "The default model"): a linear head
    # fitted on the frozen pretrained body's features, which on a few hundred photos a class beat
    # training fastai's head, and fine-tuning the whole network.
    p.add_argument("--head", choices=("auto", *HEADS), default="auto",
                   help="linear: logistic regression on the frozen body's features, no epochs; trained: fastai's "
                        "head trained for --freeze-epochs (then --epochs of the whole network); auto: linear with "
                        "pretrained weights, trained without")
    p.add_argument("--epochs", type=int, default=0,
                   help="with --head trained: epochs fine-tuning the whole network after the head")
    p.add_argument("--freeze-epochs", type=int, default=8, help="with --head trained: epochs training the head only")
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate (fine_tune's base_lr)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (0 for none)")
    p.add_argument("--size", type=int, default=224, help="input size in pixels")
    p.add_argument("--min-scale", type=float, default=0.75,
                   help="smallest share of a photo a training crop keeps (RandomResizedCrop)")
    p.add_argument("--bs", type=int, default=32, help="batch size")
    p.add_argument("--seed", type=int, default=42, help="seed of the validation split and of training")
    p.add_argument("--valid-pct", type=float, default=0.2, help="share of the photos held out for validation")
    p.add_argument("--min-per-class", type=int, default=5, help="fewest images a class may have")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: fastai's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the export, detector and card go")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument("--detector-k", type=int, default=DEFAULT_K,
                   help="unfamiliar-image detector: compare with the k-th nearest training photo")
    p.add_argument("--detector-keep", type=float, default=DEFAULT_KEEP,
                   help="share of validation photos the detector's threshold keeps familiar")
    p.add_argument("--unfamiliar", type=Path, metavar="OTHER",
                   help="photos of no class: their flagged rates go in the model card (they set no threshold)")
    p.add_argument("--outlier-exposure", action="store_true",
                   help="also learn from the --unfamiliar photos: a second test of the detector flags photos like "
                        "them (their flagged rates are then measured out of fold)")
    p.add_argument("--outlier-keep", type=float, default=OUTLIER_KEEP,
                   help="share of the training and validation photos the --outlier-exposure test keeps familiar")
    p.add_argument("--imagenet-test", choices=IMAGENET_CHOICES, default="auto",
                   help="the detector's ImageNet test (the backbone's ImageNet classifier stands in for photos of no "
                        f"class); auto: on a small set (a class with fewer than {SMALL_SET} photos) without "
                        "--outlier-exposure, with an EfficientNet-Lite body and --head linear")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT/bundle-int8, the INT8 bundle (faster on most CPUs; README, INT8 bundles)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when output is not a terminal)")
    args = p.parse_args(argv)
    if args.head == "auto":
        args.head = "linear" if args.pretrained else "trained"
    return args


def prepare_data(args: argparse.Namespace) -> tuple[list[Path], Counter[str], list[tuple[Path, str]],
                                                    DownloadReport | None]:
    """Download (if asked), verify and check the data; return the files to train on."""
    urls = parse_url_specs(args.urls)
    if args.unfamiliar is not None:
        unfamiliar_files(args.unfamiliar)  # checked before hours of training, not after
    report = None
    if urls:
        args.data.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(download_images(urls, args.data, args.max_per_class))
    classes = require_classes(args.data)
    rejected = verify_images(args.data, classes)
    files = class_files(args.data, classes)
    counts = Counter(p.parent.name for p in files)
    short = {cls: counts[cls] for cls in classes if counts[cls] < args.min_per_class}
    if short:
        listed = ", ".join(f"{cls} ({n})" for cls, n in short.items())
        raise UsageError(f"too few images (need {args.min_per_class} per class): {listed}")
    return files, counts, rejected, report


def print_summary(card: dict[str, Any], rejected: list[tuple[Path, str]], report: DownloadReport | None,
                  args: argparse.Namespace, no_bundle: str | None) -> None:
    rows = [(cls, str(n)) for cls, n in card["images_per_class"].items()]
    if report is not None:
        rows.append(("downloaded", report.summary()))
    rows += [
        ("rejected (moved to _rejected)", str(len(rejected))),
        ("validation accuracy (random split)", f"{card['valid_accuracy']:.2%}"),
        ("validation error rate", f"{card['valid_error_rate']:.2%}"),
    ]
    if card["calibration"]:
        cal = card["calibration"]
        kept = "applied" if cal["applied"] else cal["note"] or "not applied: no better"
        ece = cal["valid_ece"]
        rows.append(("temperature", f"{cal['temperature']:.3f} ({kept}); ECE {ece['before']:.3f} -> "
                                    f"{ece['after']:.3f} on {cal['photos']} photos ({cal['fitted_on']})"))
    split = card.get("source_split")
    if split:
        flags = ", ".join(f"{cls} {c['flagged']:.1%}" for cls, c in split["per_class"].items())
        rows.append(("on sources left out", f"{split['accuracy']:.2%} right; flagged {flags} ({split['photos']} "
                                            f"photos of {split['sources']} sources, by SOURCES.csv)"))
    if card["detector"]:
        det = card["detector"]
        # Joined with the ImageNet test, the k-NN test's own threshold no longer decides.
        threshold = "" if det["imagenet_test"] else f", threshold {det['threshold']:.4f}"
        rows.append(("unfamiliar-image detector", f"k={det['k']}{threshold}, flags "
                                                  f"{det['valid_false_flag_rate']:.1%} of the {det['valid_images']} "
                                                  f"photos that set it ({det['thresholds_from']})"))
        if det["outlier_exposure"]:
            rows.append(("  and outlier exposure", f"learnt from {det['outlier_exposure']['negatives']} photos of "
                                                   "no class"))
        if det["imagenet_test"]:
            rows.append(("  joined with the ImageNet test", f"the training photos' top-{TOP} ImageNet classes "
                                                           f"({det['imagenet_test']['support_classes']} of 1000)"))
        if det["unfamiliar_photos"]:
            measured = " (out of fold)" if det["outlier_exposure"] else ""
            rows.append(("  photos of no class flagged",
                         f"{det['unfamiliar_photos']['overall']['rate']:.1%}{measured}"))
    rows += [
        ("training time", f"{card['training_seconds']:.0f} s"),
        ("export", f"{card['export_bytes'] / 1e6:.1f} MB, sha256 {card['export_sha256'][:12]}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for path, reason in rejected[:10]:
        print(f"  rejected {path}: {reason}")
    for warning in card["warnings"]:
        print(f"warning: {warning}")
    export = args.out / EXPORT_NAME
    bundle = args.out / BUNDLE_NAME
    written = [export, *([detector_path(export)] if card["detector"] else []), args.out / CARD_NAME,
               *([] if no_bundle else [bundle])]
    print(f"\nwrote {', '.join(str(p) for p in written)} (and plots in {args.out})")
    if no_bundle:
        print(f"no bundle: {no_bundle}")
    print("next:")
    print(f"  review suspicious photos:  python -m app.clean {args.data}")
    print(f"  evaluate on new photos:    python -m app.evaluate HOLDOUT --model {export}")
    print(f"  serve it:                  MODEL_PATH={export} make run")
    if not no_bundle:
        print(f"  or without torch:          MODEL_PATH={bundle} make run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run() -> int:
        check_out(args.out, args.overwrite)
        if args.head == "linear" and not args.pretrained:
            raise UsageError("--head linear needs pretrained weights: a linear model on random features learns "
                             "nothing; use --head trained with --no-pretrained")
        if args.outlier_exposure and args.unfamiliar is None:
            raise UsageError("--outlier-exposure learns from photos of no class: give them with --unfamiliar OTHER")
        for option, share in (("--detector-keep", args.detector_keep), ("--outlier-keep", args.outlier_keep)):
            if not 0 < share < 1:
                raise UsageError(f"{option} is the share of photos kept familiar, between 0 and 1; got {share}")
        if args.imagenet_test == "on" and (reason := why_not(args.arch, args.head, args.pretrained)):
            raise UsageError(f"--imagenet-test on: {reason}")
        files, counts, rejected, report = prepare_data(args)
        args.imagenet_test = wanted(args.imagenet_test, args.arch, args.head, args.pretrained, args.outlier_exposure,
                                    counts)
        args.out.mkdir(parents=True, exist_ok=True)
        from fastai.torch_core import set_seed

        show_progress = not args.quiet and sys.stdout.isatty()
        set_seed(args.seed)  # same data and seed: same split, same initial head, same shuffles
        dls = make_dataloaders(args.data, files, args.size, args.bs, args.seed, args.valid_pct, args.workers,
                               args.min_scale)
        learn = new_learner(dls, architectures()[args.arch], args.pretrained, args.label_smoothing, args.head)
        train_files, train_outputs, out_of_fold = split_files(dls.train_ds), None, None
        if args.head == "linear":
            args.head_fit, seconds, train_outputs, out_of_fold = fit_linear_head(learn, train_files,
                                                                                os.cpu_count() or 1, args.seed)
        else:
            args.head_fit = None
            seconds = fit(learn, args.epochs, args.freeze_epochs, args.pretrained, args.lr, show_progress)
        valid_files = split_files(dls.valid_ds)
        card, no_bundle = complete(learn, train_files, valid_files, seconds, args, counts, argv, train_outputs,
                                   out_of_fold)
        int8_line, int8_made = int8_bundle(args, train_files, valid_files, no_bundle) if args.int8 else (None, True)
        print_summary(card, rejected, report, args, no_bundle)
        if int8_line:
            print(int8_line)
        return 0 if int8_made else USAGE_ERROR

    return run_command(run)


def int8_bundle(args: argparse.Namespace, train_files: list[Path], valid_files: list[Path],
                no_bundle: str | None) -> tuple[str, bool]:
    """OUT/bundle-int8 from OUT/bundle: what to print, and whether it was made."""
    if no_bundle:
        return f"no INT8 bundle: there is no FP32 bundle to quantize ({no_bundle})", False
    how = {"data": str(args.data), "split": split_description(args.data, args.seed, args.valid_pct)}
    out = args.out / INT8_BUNDLE_NAME
    try:
        manifest = quantize_bundle(args.out / BUNDLE_NAME, out, train_files, valid_files, os.cpu_count() or 1, how,
                                   keep=args.detector_keep)
    except ContractNotMet as exc:
        return f"no INT8 bundle: {exc}; or serve {args.out / BUNDLE_NAME}", False
    return agreement_summary(manifest, out), True


def split_files(dataset: Any) -> list[Path]:
    """The image paths of a split (`from_lists` keeps (path, label) pairs as items)."""
    return [Path(item[0] if isinstance(item, tuple) else item) for item in dataset.items]
