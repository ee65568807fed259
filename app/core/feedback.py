"""Corrections people send from the page (`POST /feedback`), kept in FEEDBACK_DIR and read back by
`python -m app.clean DATA --incoming FEEDBACK_DIR`.

A correction is two files under one name the server makes (`feedback-<UTC time>-<random>`), never
one a client sent: the photo, re-encoded by `encode_without_metadata` (so no location, camera, time
or comment survives), and a JSON record of what was said about it. The record is written second,
so a crash between the two leaves a photo nobody lists rather than a record without its photo.
Both are readable by the server's user and group only: they are photos of people's families.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.core.errors import DomainError
from app.core.files import write_atomically
from app.core.images import decode_image, encode_without_metadata

# The label that says the photo shows none of the model's classes. A model with a class of that
# very name means the same thing by it, so the class wins.
NONE_OF_THESE = "none of these"
NAME_PREFIX = "feedback-"
PHOTO_SUFFIX = ".jpg"
RECORD_SUFFIX = ".json"
FILE_MODE = 0o640
# A record is well under this; counted before writing so that the cap holds with it.
RECORD_ALLOWANCE = 4096


class FeedbackError(DomainError):
    """A correction that cannot be kept: `bad_label` (not one of the model's classes),
    `feedback_full` (FEEDBACK_MAX_MB reached, or the disk is full) or `feedback_unwritable`."""


@dataclass(frozen=True)
class Correction:
    """What was said about one kept photo."""

    photo: str  # the photo's file name in the feedback folder
    label: str | None  # the class the person chose; None: none of these
    answer: str  # the model's answer: its most probable class
    predictions: list[list[Any]]  # every class and its probability, highest first
    unfamiliar: bool | None  # the detector's verdict (None: the model has no detector)
    model_sha256: str  # the export (or bundle source) that answered
    time: str  # when it was kept, UTC, ISO 8601

    @property
    def name(self) -> str:
        return self.photo.removesuffix(PHOTO_SUFFIX)


def parse_label(value: object, classes: list[str]) -> str | None:
    """The class a person chose (None for none of these), or `bad_label`."""
    if isinstance(value, str) and value in classes:
        return value
    if value == NONE_OF_THESE:
        return None
    choices = ", ".join(repr(c) for c in classes)
    raise FeedbackError("bad_label", f"The label must be one of the model's classes ({choices}) or {NONE_OF_THESE!r}.")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`, rejected corrections included: all of it is on disk."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile
                continue
    return total


def new_name(now: float) -> str:
    """`feedback-<UTC time to the microsecond>-<random>`: names sort in the order kept."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1e6) % 1_000_000:06d}Z"
    return f"{NAME_PREFIX}{stamp}-{secrets.token_hex(4)}"


class FeedbackStore:
    """The feedback folder, with a cap on the bytes it holds. Nothing in it is ever replaced or
    removed here: a full folder refuses new corrections and keeps every one it has."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        # One write at a time in this process, so two cannot both pass the cap check. Replicas
        # sharing a volume each check on their own: the cap can be passed by a photo per replica.
        self._lock = threading.Lock()

    def keep(self, photo: bytes, label: str | None, predictions: list[list[Any]], unfamiliar: bool | None,
             model_sha256: str) -> Correction:
        """Write the (already metadata-free) photo and its record; blocking, run it in a thread."""
        with self._lock:
            if folder_bytes(self.folder) + len(photo) + RECORD_ALLOWANCE > self.max_bytes:
                raise FeedbackError("feedback_full", "This server is not keeping more corrections for now: its "
                                                     "space for them is full. Thank you all the same.")
            now = time.time()
            name = new_name(now)
            correction = Correction(photo=name + PHOTO_SUFFIX, label=label, answer=predictions[0][0],
                                    predictions=predictions, unfamiliar=unfamiliar, model_sha256=model_sha256,
                                    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
            photo_path = self.folder / correction.photo
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomically(photo_path, photo, FILE_MODE)
                record = json.dumps(asdict(correction), indent=2) + "\n"
                write_atomically(self.folder / (name + RECORD_SUFFIX), record.encode(), FILE_MODE)
            except OSError as exc:
                photo_path.unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FeedbackError("feedback_full", "The server's disk is full: the correction was not "
                                                         "kept.") from None
                raise FeedbackError("feedback_unwritable", "The correction could not be kept on this "
                                                           "server.") from None
            return correction


def read_corrections(folder: Path, pending: bool = True) -> list[Correction]:
    """The corrections kept in `folder`, oldest first; `pending`: only those whose photo is still
    there (not reviewed yet). A record that cannot be read (hand-edited, half-copied) is passed
    over, not fatal."""
    corrections = []
    for record in sorted(folder.glob(f"{NAME_PREFIX}*{RECORD_SUFFIX}")):
        try:
            fields = json.loads(record.read_text(encoding="utf-8"))
            correction = Correction(**fields)
        except (OSError, ValueError, TypeError):
            continue
        # The photo named by the record must be the one beside it, never a path elsewhere.
        if correction.photo == record.stem + PHOTO_SUFFIX and (not pending or (folder / correction.photo).is_file()):
            corrections.append(correction)
    return corrections


def photo_to_keep(data: bytes, max_pixels: int) -> bytes:
    """The photo as kept: upright, re-encoded without any of its metadata (`ImageError` if `data`
    is not a photo this project reads)."""
    return encode_without_metadata(decode_image(data, max_pixels))
