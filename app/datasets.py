"""Folders of photos, one sub-folder per class: what the model-building commands read.

Shared by `app.train`, `app.evaluate` and `app.clean`, so that all three see the same files.
"""

from __future__ import annotations

from pathlib import Path

# Where `app.train` and `app.clean` move photos that must not be trained on; never a class.
REJECTED_DIR = "_rejected"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class UsageError(Exception):
    """Bad input from the person running a command: reported in one line, exit status 2."""


def find_classes(data: Path) -> list[str]:
    """Class names are the sub-folders of `data`, except hidden ones and those starting with `_`
    (such as `_rejected`)."""
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def split(files: list[Path], valid_pct: float, seed: int) -> tuple[list[Path], list[Path]]:
    """The training and validation files `app.train` uses for this file list, seed and share
    (fastai's RandomSplitter, which `ImageDataLoaders.from_lists` applies), to measure a model
    again on exactly the photos it was validated on."""
    from fastai.data.transforms import RandomSplitter

    train_idx, valid_idx = RandomSplitter(valid_pct, seed)(files)
    return [files[i] for i in train_idx], [files[i] for i in valid_idx]


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and below it, if `recursive`, skipping folders whose names start
    with `_` or `.`), sorted so that the same data always gives the same split."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))
