"""Train an image classifier the fast.ai lesson 2 way and export it for the server.

    python -m app.train DATA [--urls CLASS=FILE ...] [--arch efficientnet_lite0] [--out models]

DATA holds one folder per class. With `--urls`, images listed in text files (one URL a line, as
saved from an image search) are downloaded into those folders first. Every image is verified
before training; files that do not decode are moved to DATA/_rejected/, never deleted.

After training, a temperature fitted on the validation split is folded into the last layer (when
it makes the probabilities better calibrated), and an unfamiliar-image detector is fitted on the
model's features of the training photos (`app.detector`). Validation figures are measured the way
the server runs the model.

Writes OUT/export.pkl (`learn.export()`), OUT/export.detector.npz, OUT/model-card.json,
OUT/confusion-matrix.png and OUT/top-losses.png. Exits 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.calibration import Calibration, calibrate, fold_temperature
from app.datasets import REJECTED_DIR, UsageError, find_classes, image_files
from app.detector import Detector, detector_path
from app.evaluate import Outputs, confusion_matrix, predict_files, unfamiliar_files, unfamiliar_rates
from app.model_store import sha256_file
from app.predictor import build_predictor

# The unfamiliar-image detector's defaults: see the model card and README for how they were chosen.
DETECTOR_K = 5
DETECTOR_KEEP = 0.97
# Pillow's format name -> file suffix for downloaded images.
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


# --- Data ----------------------------------------------------------------------------------------


def image_decodes(path: Path) -> bool:
    """True if Pillow can decode the whole file (a truncated JPEG fails here, not mid-training)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # Pillow raises many types for broken files; every one means "reject".
        return False


def verify_images(data: Path, classes: list[str]) -> list[Path]:
    """Move files that do not decode to DATA/_rejected/CLASS/ and return the moved paths."""
    rejected = []
    for cls in classes:
        for path in image_files(data / cls):
            if image_decodes(path):
                continue
            dest = data / REJECTED_DIR / cls / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
            rejected.append(dest)
    return rejected


# --- Downloading ---------------------------------------------------------------------------------


@dataclass
class DownloadReport:
    saved: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)


def parse_url_specs(specs: list[str]) -> dict[str, list[str]]:
    """Parse `CLASS=FILE` options into {class: [url, ...]}."""
    urls: dict[str, list[str]] = {}
    for spec in specs:
        cls, sep, filename = spec.partition("=")
        if not sep or not cls or not filename:
            raise UsageError(f"--urls takes CLASS=FILE, got {spec!r}")
        try:
            lines = Path(filename).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read URL file {filename}: {exc}") from None
        urls.setdefault(cls, []).extend(u.strip() for u in lines if u.strip() and not u.startswith("#"))
    return urls


async def _download_one(session, url: str, dest_dir: Path, max_bytes: int) -> bool:
    import aiohttp

    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return False
            body = await resp.content.read(max_bytes + 1)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return False
    if len(body) > max_bytes:
        return False
    try:
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            suffix = FORMAT_SUFFIX.get(im.format or "")
    except Exception:  # not an image: an HTML error page, a truncated file...
        return False
    if suffix is None:
        return False
    # Name files by content so that re-running a download never duplicates an image.
    (dest_dir / (hashlib.sha256(body).hexdigest()[:16] + suffix)).write_bytes(body)
    return True


async def download_images(
    urls: dict[str, list[str]],
    data: Path,
    max_per_class: int,
    concurrency: int = 8,
    timeout_s: float = 15,
    max_bytes: int = 20 << 20,
    show_progress: bool = True,
) -> DownloadReport:
    """Download up to `max_per_class` images per class into DATA/CLASS/, skipping dead links."""
    import aiohttp
    from fastprogress.fastprogress import progress_bar

    report = DownloadReport()
    jobs = [(cls, url) for cls, class_urls in urls.items() for url in class_urls[:max_per_class]]
    for cls in urls:
        (data / cls).mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(concurrency)
    bar = progress_bar(range(len(jobs)), display=show_progress)
    bar.update(0)
    done = 0

    async def fetch(session, cls: str, url: str) -> None:
        nonlocal done
        async with semaphore:
            ok = await _download_one(session, url, data / cls, max_bytes)
        (report.saved if ok else report.failed)[cls] += 1
        done += 1
        bar.update(done)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(fetch(session, cls, url) for cls, url in jobs))
    return report


# --- Training ------------------------------------------------------------------------------------


ARCHITECTURES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34", "tiny_cnn")


def architectures() -> dict[str, Callable]:
    from torchvision.models import resnet18, resnet34

    from app.arch import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, tiny_cnn

    archs = {"efficientnet_lite0": efficientnet_lite0, "efficientnet_lite1": efficientnet_lite1,
             "efficientnet_lite2": efficientnet_lite2, "resnet18": resnet18, "resnet34": resnet34,
             "tiny_cnn": tiny_cnn}
    assert tuple(archs) == ARCHITECTURES
    return archs


def make_dataloaders(data: Path, files: list[Path], size: int, bs: int, seed: int, valid_pct: float,
                     workers: int | None, min_scale: float = 0.5):
    """The lesson's DataLoaders, built from an explicit sorted file list so `_rejected` is never a
    class and the same data and seed always give the same validation split."""
    from fastai.vision.all import ImageDataLoaders, RandomResizedCrop, aug_transforms

    kwargs = {} if workers is None else {"num_workers": workers}
    return ImageDataLoaders.from_lists(
        data, files, [p.parent.name for p in files], valid_pct=valid_pct, seed=seed, bs=bs,
        item_tfms=RandomResizedCrop(size, min_scale=min_scale), batch_tfms=aug_transforms(), **kwargs,
    )


def train(dls, arch: Callable, epochs: int, freeze_epochs: int, pretrained: bool, lr: float,
          label_smoothing: float = 0.0, hidden: list[int] | None = None,
          show_progress: bool = True) -> tuple[Any, float]:
    """A fine-tuned learner, and the seconds its training took."""
    import torch
    from fastai.vision.all import (
        BnFreeze,
        CrossEntropyLossFlat,
        LabelSmoothingCrossEntropyFlat,
        accuracy,
        error_rate,
        vision_learner,
    )

    # Label smoothing: image-search labels are noisy, and a model not pushed towards certainty on
    # them generalises better; the temperature fitted afterwards (app.calibration) restores honest
    # probabilities. train_bn=False: while the body is frozen its BatchNorm layers stay frozen too,
    # so the frozen epochs need no backward pass through the body (4x cheaper on a 2-core CPU).
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()
    # BnFreeze: a frozen layer's BatchNorm statistics stay ImageNet's too, instead of drifting
    # towards augmented batches of a few hundred photos (measured: the head alone reaches 96.3%
    # on the bears without it; see the model card for what it reaches with it).
    learn = vision_learner(dls, arch, loss_func=loss, metrics=[accuracy, error_rate], pretrained=pretrained,
                           train_bn=False, cbs=[BnFreeze()], lin_ftrs=hidden)
    # Depthwise convolutions run ~25% faster on CPU in channels-last layout.
    learn.model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with contextlib.ExitStack() as quiet:
        if not show_progress:
            quiet.enter_context(learn.no_bar())
            quiet.enter_context(learn.no_logging())
        if not pretrained:
            # No pretrained body to keep: the whole network learns, at one learning rate.
            learn.unfreeze()
            learn.fit_one_cycle(freeze_epochs + epochs, lr)
        elif epochs:
            learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
        else:
            # The head alone, on the pretrained body's features: on a small data set this can beat
            # fine-tuning the whole network, which also forgets what ImageNet taught the body.
            learn.freeze()
            learn.fit_one_cycle(freeze_epochs, lr)
    return learn, time.perf_counter() - start


# --- After training: calibration, validation the server's way, the detector ----------------------


@dataclass
class Finished:
    """What `finish` measured and wrote."""

    vocab: list[str]
    valid: Outputs  # the validation photos, run as the server runs them (after calibration)
    targets: np.ndarray
    calibration: Calibration | None
    detector: Detector | None
    export_path: Path
    unfamiliar: dict[str, Any] | None = None  # flagged rates of --unfamiliar photos, per folder

    @property
    def predicted(self) -> np.ndarray:
        return self.valid.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.targets).mean())

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.targets, self.predicted, len(self.vocab))


def finish(learn: Any, train_files: list[Path], valid_files: list[Path], out: Path, k: int, keep: float,
           unfamiliar: Path | None = None, threads: int | None = None) -> Finished:
    """Calibrate, export and fit the unfamiliar-image detector, all through the server's own
    decoding and preprocessing (the torch fallback of `app.predictor`), so that the validation
    figures and the detector's reference features are what the server will see."""
    from scipy.special import softmax

    from app.features import with_features

    vocab = [str(v) for v in learn.dls.vocab]
    threads = threads or os.cpu_count() or 1
    has_features = with_features(learn.model) is not None
    predictor = build_predictor(learn, out / "export.pkl", "", threads, backend="torch", features=has_features)
    valid = predict_files(predictor, None, valid_files)
    targets = np.array([vocab.index(p.parent.name) for p in valid.files])
    # log-probabilities are the logits up to a constant per row, which softmax ignores.
    log_probs = np.log(np.maximum(valid.probs.astype(np.float64), np.finfo(np.float32).tiny))
    calibration = calibrate(log_probs, targets) if predictor.activation == "softmax" else None
    if calibration is not None and calibration.applied:
        fold_temperature(learn.model, calibration.temperature)
        valid.probs = softmax(log_probs / calibration.temperature, axis=1).astype(np.float32)
    export_path = export(learn, out)
    detector = None
    if has_features and valid.features is not None:
        reference = predict_files(predictor, None, train_files).features
        detector = Detector.fit(sha256_file(export_path), reference, valid.features, k, keep)
        detector.save(detector_path(export_path))
    else:
        detector_path(export_path).unlink(missing_ok=True)
    finished = Finished(vocab, valid, targets, calibration, detector, export_path)
    if unfamiliar is not None and detector is not None:
        finished.unfamiliar = unfamiliar_rates(predictor, detector, unfamiliar)
    return finished


def export(learn: Any, out: Path) -> Path:
    learn.path = out
    path = out / "export.pkl"
    learn.export(path.resolve())
    return path


def save_plots(done: Finished, out: Path, top: int = 9) -> None:
    """The validation confusion matrix and the photos with the highest loss, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    ConfusionMatrixDisplay(done.confusion, display_labels=done.vocab).plot(cmap="Blues", colorbar=False)
    plt.title("validation: actual (rows) vs predicted")
    plt.savefig(out / "confusion-matrix.png", bbox_inches="tight", dpi=100)
    plt.close("all")

    probs = done.valid.probs
    losses = -np.log(np.maximum(probs[np.arange(len(done.targets)), done.targets], 1e-12))
    order = np.argsort(-losses)[:top]
    cols = max(1, int(np.ceil(np.sqrt(len(order)))))
    rows = int(np.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order, strict=False):
        with Image.open(done.valid.files[i]) as im:
            ax.imshow(im.convert("RGB"))
        guess = int(probs[i].argmax())
        ax.set_title(f"{done.vocab[done.targets[i]]} -> {done.vocab[guess]}\n"
                     f"p={probs[i][guess]:.2f} loss={losses[i]:.2f}", fontsize=9)
    fig.suptitle("validation photos with the highest loss (actual -> predicted)")
    fig.savefig(out / "top-losses.png", bbox_inches="tight", dpi=80)
    plt.close("all")


def model_card(done: Finished, learn: Any, args: argparse.Namespace, counts: Counter, train_images: int,
               seconds: float, argv: list[str]) -> dict:
    import fastai
    import torch
    import torchvision

    norm = [t for t in learn.dls.after_batch if type(t).__name__ == "Normalize"]
    stats = None
    if norm:
        stats = {"mean": [round(v, 4) for v in norm[0].mean.flatten().tolist()],
                 "std": [round(v, 4) for v in norm[0].std.flatten().tolist()]}
    detector = None
    if done.detector is not None:
        detector = {**done.detector.describe(),
                    "threshold_rule": f"the {1 - args.detector_keep:.0%} quantile of the validation split's "
                                      "scores (validation photos only; photos of no class never set it)",
                    "unfamiliar_photos": done.unfamiliar}
    return {
        "classes": done.vocab,
        "architecture": args.arch,
        "pretrained": args.pretrained,
        "input_size": args.size,
        "normalization": stats,
        "images_per_class": dict(sorted(counts.items())),
        "train_images": train_images,
        "valid_images": len(done.targets),
        "epochs": {"frozen": args.freeze_epochs, "unfrozen": args.epochs},
        "learning_rate": args.lr,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "valid_pct": args.valid_pct,
        "valid_accuracy": round(done.accuracy, 4),
        "valid_error_rate": round(1 - done.accuracy, 4),
        "confusion_matrix": {"labels": done.vocab, "rows_actual_cols_predicted": done.confusion.tolist()},
        "calibration": done.calibration.describe() if done.calibration is not None else None,
        "detector": detector,
        "training_seconds": round(seconds, 1),
        "versions": {"fastai": fastai.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": sys.version.split()[0]},
        "command": shlex.join(["python", "-m", "app.train", *argv]),
        "export_sha256": sha256_file(done.export_path),
        "export_bytes": done.export_path.stat().st_size,
    }


# --- Command line --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("--urls", action="append", default=[], metavar="CLASS=FILE",
                        help="download the image URLs in FILE into DATA/CLASS first (repeatable)")
    parser.add_argument("--max-per-class", type=int, default=200, help="most URLs downloaded per class")
    parser.add_argument("--arch", default="efficientnet_lite0", choices=ARCHITECTURES)
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start from ImageNet weights (offline only for efficientnet_lite0)")
    # Defaults: what measured best on the bear photos (README, "The default model"): the head alone
    # on the frozen pretrained body, which on a few hundred photos a class beat fine-tuning it all.
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs fine-tuning the whole network after the head (default 0: the head only)")
    parser.add_argument("--freeze-epochs", type=int, default=8, help="epochs training the head only")
    parser.add_argument("--lr", type=float, default=3e-3, help="base learning rate (fine_tune's base_lr)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (0 for none)")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    parser.add_argument("--min-scale", type=float, default=0.75,
                        help="smallest share of a photo a training crop keeps (RandomResizedCrop)")
    parser.add_argument("--bs", type=int, default=32, help="batch size")
    parser.add_argument("--seed", type=int, default=42, help="seed of the validation split and of training")
    parser.add_argument("--valid-pct", type=float, default=0.2)
    parser.add_argument("--min-per-class", type=int, default=5, help="fewest images a class may have")
    parser.add_argument("--workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--out", type=Path, default=Path("models"), help="where the export goes")
    parser.add_argument("--detector-k", type=int, default=DETECTOR_K,
                        help="unfamiliar-image detector: compare with the k-th nearest training photo")
    parser.add_argument("--detector-keep", type=float, default=DETECTOR_KEEP,
                        help="share of validation photos the detector's threshold keeps familiar")
    parser.add_argument("--unfamiliar", type=Path, metavar="OTHER",
                        help="photos of no class: their flagged rates go in the model card (never tune on them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def prepare_data(args: argparse.Namespace) -> tuple[list[Path], Counter, int, DownloadReport | None]:
    """Download (if asked), verify and check the data; return the files to train on."""
    urls = parse_url_specs(args.urls)
    report = None
    if urls:
        args.data.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(download_images(urls, args.data, args.max_per_class,
                                             show_progress=not args.quiet))
    if args.unfamiliar is not None:
        unfamiliar_files(args.unfamiliar)  # checked before hours of training, not after
    classes = find_classes(args.data)
    if len(classes) < 2:
        raise UsageError(f"need at least two class folders in {args.data}, found {len(classes)}")
    rejected = verify_images(args.data, classes)
    files = [p for cls in classes for p in image_files(args.data / cls)]
    counts = Counter(p.parent.name for p in files)
    short = {cls: counts[cls] for cls in classes if counts[cls] < args.min_per_class}
    if short:
        listed = ", ".join(f"{cls} ({n})" for cls, n in short.items())
        raise UsageError(f"too few images (need {args.min_per_class} per class): {listed}")
    return files, counts, len(rejected), report


def print_summary(card: dict, rejected: int, report: DownloadReport | None) -> None:
    rows = [(cls, str(n)) for cls, n in card["images_per_class"].items()]
    if report is not None:
        rows.append(("downloaded", f"{sum(report.saved.values())} saved, {sum(report.failed.values())} failed"))
    rows += [
        ("rejected (undecodable)", str(rejected)),
        ("validation accuracy", f"{card['valid_accuracy']:.2%}"),
        ("validation error rate", f"{card['valid_error_rate']:.2%}"),
    ]
    if card["calibration"]:
        cal = card["calibration"]
        kept = "applied" if cal["applied"] else cal["note"] or "not applied: no better"
        ece = cal["valid_ece"]
        rows.append(("temperature", f"{cal['temperature']:.3f} ({kept}); validation ECE {ece['before']:.3f} -> "
                                    f"{ece['after']:.3f}"))
    if card["detector"]:
        det = card["detector"]
        rows.append(("unfamiliar-image detector", f"k={det['k']}, threshold {det['threshold']:.4f}, "
                                                  f"flags {det['valid_false_flag_rate']:.1%} of validation photos"))
        if det["unfamiliar_photos"]:
            rows.append(("  photos of no class flagged", f"{det['unfamiliar_photos']['overall']['rate']:.1%}"))
    rows += [
        ("training time", f"{card['training_seconds']:.0f} s"),
        ("export", f"{card['export_bytes'] / 1e6:.1f} MB, sha256 {card['export_sha256'][:12]}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    from app.logs import quiet_library_warnings

    quiet_library_warnings()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        files, counts, rejected, report = prepare_data(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from fastai.torch_core import set_seed

    set_seed(args.seed)  # same data and seed: same split, same initial head, same shuffles
    dls = make_dataloaders(args.data, files, args.size, args.bs, args.seed, args.valid_pct, args.workers,
                           args.min_scale)
    learn, seconds = train(dls, architectures()[args.arch], args.epochs, args.freeze_epochs, args.pretrained,
                           args.lr, args.label_smoothing, show_progress=not args.quiet)
    card = complete(learn, split_files(dls.train_ds), split_files(dls.valid_ds), seconds, args, counts, argv)
    print_summary(card, rejected, report)
    return 0


def split_files(dataset: Any) -> list[Path]:
    """The image paths of a split (`from_lists` keeps (path, label) pairs as items)."""
    return [Path(item[0] if isinstance(item, tuple) else item) for item in dataset.items]


def complete(learn: Any, train_files: list[Path], valid_files: list[Path], seconds: float, args: argparse.Namespace,
             counts: Counter, argv: list[str]) -> dict:
    """Everything after the training loop: calibration, export, detector, plots and model card."""
    done = finish(learn, train_files, valid_files, args.out, args.detector_k, args.detector_keep, args.unfamiliar)
    save_plots(done, args.out)
    card = model_card(done, learn, args, counts, len(train_files), seconds, argv)
    (args.out / "model-card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


if __name__ == "__main__":
    raise SystemExit(main())
