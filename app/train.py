"""Train an image classifier the fast.ai lesson 2 way and export it for the server.

    python -m app.train DATA [--urls CLASS=FILE ...] [--arch efficientnet_lite0] [--out models]

DATA holds one folder per class. With `--urls`, images listed in text files (one URL a line, as
saved from an image search) are downloaded into those folders first. Every image is verified
before training; files that do not decode are moved to DATA/_rejected/, never deleted.

Writes OUT/export.pkl (`learn.export()`), OUT/model-card.json, OUT/confusion-matrix.png and
OUT/top-losses.png. Exits 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from app.model_store import sha256_file

REJECTED_DIR = "_rejected"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Pillow's format name -> file suffix for downloaded images.
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class UsageError(Exception):
    """Bad input from the person running the command: reported in one line, exit status 2."""


# --- Data ----------------------------------------------------------------------------------------


def find_classes(data: Path) -> list[str]:
    """Class names are the sub-folders of `data`, except hidden ones and `_rejected`."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted so that the same data always gives the same split."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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


ARCHITECTURES = ("efficientnet_lite0", "resnet18", "resnet34", "tiny_cnn")


def architectures() -> dict[str, Callable]:
    from torchvision.models import resnet18, resnet34

    from app.arch import efficientnet_lite0, tiny_cnn

    archs = {"efficientnet_lite0": efficientnet_lite0, "resnet18": resnet18, "resnet34": resnet34,
             "tiny_cnn": tiny_cnn}
    assert tuple(archs) == ARCHITECTURES
    return archs


def make_dataloaders(data: Path, files: list[Path], size: int, bs: int, seed: int, valid_pct: float,
                     workers: int | None):
    """The lesson's DataLoaders, built from an explicit sorted file list so `_rejected` is never a
    class and the same data and seed always give the same validation split."""
    from fastai.vision.all import ImageDataLoaders, RandomResizedCrop, aug_transforms

    kwargs = {} if workers is None else {"num_workers": workers}
    return ImageDataLoaders.from_lists(
        data, files, [p.parent.name for p in files], valid_pct=valid_pct, seed=seed, bs=bs,
        item_tfms=RandomResizedCrop(size, min_scale=0.5), batch_tfms=aug_transforms(), **kwargs,
    )


@dataclass
class TrainResult:
    learn: Any
    interp: Any  # fastai ClassificationInterpretation on the validation set
    seconds: float

    @property
    def confusion(self) -> list[list[int]]:
        return self.interp.confusion_matrix().tolist()

    @property
    def accuracy(self) -> float:
        matrix = self.interp.confusion_matrix()
        return float(matrix.trace() / max(1, matrix.sum()))

    @property
    def error_rate(self) -> float:
        return 1.0 - self.accuracy


def train(dls, arch: Callable, epochs: int, freeze_epochs: int, pretrained: bool, lr: float,
          show_progress: bool = True) -> TrainResult:
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from fastai.vision.all import ClassificationInterpretation, accuracy, error_rate, vision_learner

    # train_bn=False: while the body is frozen its BatchNorm layers stay frozen too, so the frozen
    # epochs need no backward pass through the body (4x cheaper on a 2-core CPU).
    learn = vision_learner(dls, arch, metrics=[accuracy, error_rate], pretrained=pretrained,
                           train_bn=False)
    # Depthwise convolutions run ~25% faster on CPU in channels-last layout.
    learn.model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    if show_progress:
        learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
    else:
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
    seconds = time.perf_counter() - start
    with learn.no_bar():
        interp = ClassificationInterpretation.from_learner(learn)  # one pass over the validation set
    return TrainResult(learn, interp, seconds)


def save_plots(result: TrainResult, out: Path) -> None:
    import matplotlib.pyplot as plt

    interp = result.interp
    interp.plot_confusion_matrix(figsize=(5, 5))
    plt.savefig(out / "confusion-matrix.png", bbox_inches="tight", dpi=100)
    plt.close("all")
    k = min(9, len(result.learn.dls.valid_ds))
    interp.plot_top_losses(k, nrows=max(1, int(k ** 0.5)))
    plt.savefig(out / "top-losses.png", bbox_inches="tight", dpi=80)
    plt.close("all")


def export(result: TrainResult, out: Path) -> Path:
    learn = result.learn
    learn.path = out
    path = out / "export.pkl"
    learn.export(path.resolve())
    return path


def model_card(result: TrainResult, args: argparse.Namespace, counts: Counter, export_path: Path,
               argv: list[str]) -> dict:
    import fastai
    import torch
    import torchvision

    dls = result.learn.dls
    norm = [t for t in dls.after_batch if type(t).__name__ == "Normalize"]
    stats = None
    if norm:
        stats = {"mean": [round(v, 4) for v in norm[0].mean.flatten().tolist()],
                 "std": [round(v, 4) for v in norm[0].std.flatten().tolist()]}
    return {
        "classes": list(dls.vocab),
        "architecture": args.arch,
        "pretrained": args.pretrained,
        "input_size": args.size,
        "normalization": stats,
        "images_per_class": dict(sorted(counts.items())),
        "train_images": len(dls.train_ds),
        "valid_images": len(dls.valid_ds),
        "epochs": {"frozen": args.freeze_epochs, "unfrozen": args.epochs},
        "seed": args.seed,
        "valid_pct": args.valid_pct,
        "valid_accuracy": round(result.accuracy, 4),
        "valid_error_rate": round(result.error_rate, 4),
        "confusion_matrix": {"labels": list(dls.vocab), "rows_actual_cols_predicted": result.confusion},
        "training_seconds": round(result.seconds, 1),
        "versions": {"fastai": fastai.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": sys.version.split()[0]},
        "command": shlex.join(["python", "-m", "app.train", *argv]),
        "export_sha256": sha256_file(export_path),
        "export_bytes": export_path.stat().st_size,
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
    parser.add_argument("--epochs", type=int, default=3, help="epochs after unfreezing")
    parser.add_argument("--freeze-epochs", type=int, default=1, help="epochs training the head only")
    parser.add_argument("--lr", type=float, default=2e-3, help="base learning rate for fine_tune")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    parser.add_argument("--bs", type=int, default=32, help="batch size")
    parser.add_argument("--seed", type=int, default=42, help="seed of the validation split and of training")
    parser.add_argument("--valid-pct", type=float, default=0.2)
    parser.add_argument("--min-per-class", type=int, default=5, help="fewest images a class may have")
    parser.add_argument("--workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--out", type=Path, default=Path("models"), help="where the export goes")
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
    dls = make_dataloaders(args.data, files, args.size, args.bs, args.seed, args.valid_pct, args.workers)
    result = train(dls, architectures()[args.arch], args.epochs, args.freeze_epochs, args.pretrained,
                   args.lr, show_progress=not args.quiet)
    save_plots(result, args.out)
    export_path = export(result, args.out)
    card = model_card(result, args, counts, export_path, argv)
    (args.out / "model-card.json").write_text(json.dumps(card, indent=2) + "\n")
    print_summary(card, rejected, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
