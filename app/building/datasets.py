"""Folders of photos, one sub-folder per class: what the model-building commands read.

Shared by `app.train`, `app.evaluate` and `app.clean`, so that all three see the same files, and
listing exactly the formats the server reads (`app.core.formats`).
"""

from __future__ import annotations

from pathlib import Path

from app.building.cli import UsageError
from app.core.formats import READ_SUFFIXES, REFUSED_SUFFIXES

IMAGE_SUFFIXES = READ_SUFFIXES | REFUSED_SUFFIXES
# Where `app.train` and `app.clean` move photos that must not be trained on; never a class.
REJECTED_DIR = "_rejected"
# Where `app.clean` puts photos of none of the classes: the folder to give `--unfamiliar`.
UNFAMILIAR_DIR = "_unfamiliar"


def find_classes(data: Path) -> list[str]:
    """Class names are the sub-folders of `data`, except hidden ones and those starting with `_`
    (such as `_rejected`)."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def require_classes(data: Path) -> list[str]:
    """The class folders of `data`, at least two; a `UsageError` that says what is there instead."""
    classes = find_classes(data)
    if len(classes) >= 2:
        return classes
    loose = image_files(data)
    hint = (f"; the {len(loose)} photos directly in it must go into one sub-folder per class "
            f"(for example {data}/teddys/, {data}/grizzly/)") if loose else ""
    raise UsageError(f"need at least two class folders (one sub-folder of photos per class) in {data}, "
                     f"found {len(classes)}{hint}")


def class_files(data: Path, classes: list[str]) -> list[Path]:
    """The photos of `classes`' folders of `data`, class by class: the list `app.train` trains on,
    in the order its validation split (`split`) depends on."""
    return [p for cls in classes for p in image_files(data / cls)]


def split(files: list[Path], valid_pct: float, seed: int) -> tuple[list[Path], list[Path]]:
    """The training and validation files `app.train` uses for this file list, seed and share
    (fastai's RandomSplitter, which `ImageDataLoaders.from_lists` applies), to measure a model
    again on exactly the photos it was validated on."""
    from fastai.data.transforms import RandomSplitter

    train_idx, valid_idx = RandomSplitter(valid_pct, seed)(files)
    return [files[i] for i in train_idx], [files[i] for i in valid_idx]


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and below it, if `recursive`, skipping folders whose names start
    with `_` or `.`), sorted so that the same data always gives the same split. Files of a format
    the server refuses (TIFF, ...) are listed too, so that each command refuses them the way the
    server does (`app.core.images.decode_image`) and says so, instead of passing over them."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


def loose_photos_hint(data: Path) -> str:
    """For a message about missing class folders: the photos lying directly in `data`, if any."""
    loose = image_files(data)
    return f" ({len(loose)} photos lie directly in it: put them in one sub-folder per class)" if loose else ""


def labelled_files(data: Path, vocab: list[str]) -> tuple[list[Path], list[int]]:
    """The photos in DATA's class folders, and each one's class index in `vocab`."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    folders = [data / name for name in find_classes(data)]
    unknown = [p.name for p in folders if p.name not in vocab]
    if unknown:
        raise UsageError(f"folders {', '.join(unknown)} in {data} are not classes of the model "
                         f"(its classes: {', '.join(vocab)})")
    files = [f for folder in folders for f in image_files(folder)]
    if not files:
        raise UsageError(f"no images in the class folders of {data}{loose_photos_hint(data)}")
    return files, [vocab.index(f.parent.name) for f in files]
