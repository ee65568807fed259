"""A model file on disk, checked before anything unpickles it: present, a file, not an HTML page,
a Git LFS pointer or a truncated archive, not a bare state dict or torch model, an image
classifier's export of a fastai this server loads (`app.core.export_kind`), and the expected sha256.

Every failure is a `ModelLoadError` whose message is the one line an operator needs: what the file
is and what to do. Nothing here runs the file's code: pickles are read opcode by opcode only.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.export_kind import before_2_8, export_kind, installed_fastai, old_fastai_message
from app.core.files import sha256_file

# torch.save() writes a zip archive; very old exports are a bare pickle stream (protocol >= 2).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
_LFS_POINTER = b"version https://git-lfs"


class ModelLoadError(Exception):
    """The model cannot be served; the message is the one line an operator needs."""


@dataclass(frozen=True)
class ModelFile:
    """An export on disk that passed the cheap checks (present, not HTML, the expected hash)."""

    path: Path
    sha256: str
    card: dict[str, Any] | None


def looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:512].lower()
    return start.startswith((b"<!doctype", b"<html", b"<head", b"<?xml")) or b"<html" in start


def html_error(where: object) -> ModelLoadError:
    return ModelLoadError(
        f"{where} is an HTML page, not a model: the link was probably a share page "
        "(Google Drive, Dropbox...); use a direct download link in MODEL_URL"
    )


def sha_error(where: object, actual: str, expected: str) -> ModelLoadError:
    return ModelLoadError(
        f"{where} has sha256 {actual} but MODEL_SHA256 is {expected}: "
        "the file is corrupt or not the model you meant; fix MODEL_SHA256 or the file"
    )


def _missing(path: Path) -> ModelLoadError:
    if path.is_dir():
        inside = path / "export.pkl"
        hint = f"set MODEL_PATH to {inside}" if inside.is_file() else "set MODEL_PATH to the export.pkl file itself"
        return ModelLoadError(f"model path {path} is a folder, not a model file (nor a bundle: it has no "
                              f"manifest.json): {hint}")
    return ModelLoadError(
        f"model file {path} not found: train one with `python -m app.train DATA`, "
        "or set MODEL_PATH to an export.pkl (or MODEL_URL to download one)"
    )


def pickle_names(path: Path, limit: int = 1 << 22) -> set[str] | None:
    """The globals a torch zip archive's pickle imports (each as `module`, `name` and
    `module.name`), read opcode by opcode without unpickling; None if it is not such an archive.
    Only imports count: docstrings and other strings in the pickle are not names. `limit` bounds
    the bytes read."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with archive.open(name) as f:
                data = f.read(limit)
        return {part for module, qualname in _imports(data) for part in (module, qualname, f"{module}.{qualname}")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def _imports(data: bytes) -> list[tuple[str, str]]:
    """(module, name) of every GLOBAL and STACK_GLOBAL opcode; the latter takes the two strings
    pushed before it, directly or from the memo."""
    found: list[tuple[str, str]] = []
    strings: list[str | None] = []
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name == "GLOBAL":
            module, _, qualname = str(arg).partition(" ")
            found.append((module, qualname))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(arg)))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = strings[-1] if strings else None
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
            found.append((str(strings[-2]), str(strings[-1])))
        if name not in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "BINGET", "LONG_BINGET", "GET",
                        "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            strings.clear()  # only strings pushed right before STACK_GLOBAL name what it imports
    return found


def _not_an_export(path: Path) -> ModelLoadError | None:
    """The classic lesson-2 confusions (weights saved instead of an exported learner), learners
    for other tasks than classifying images, and exports of a fastai this server cannot load."""
    names = pickle_names(path)
    if names is None:
        return None
    if "fastai.learner" in names:
        kind = export_kind(names)
        if kind.refusal is not None:
            return ModelLoadError(f"{path} is {kind.refusal}")
        installed = installed_fastai()
        if kind.made_before_2_8 and (installed is None or not before_2_8(installed)):
            return ModelLoadError(old_fastai_message(path, installed))
        return None
    if "fastai.basic_train" in names:
        return ModelLoadError(f"{path} is a fastai v1 export (fastai.basic_train.Learner), which is not supported: "
                              "fastai 2 is another library (no v1 Learner, data or transforms to load it with, and "
                              "v1 needs a torch from 2019); retrain and export with fastai 2's learn.export()")
    if any(n.startswith("torch.nn.modules") for n in names):
        return ModelLoadError(f"{path} is a whole PyTorch model saved with torch.save(model), not a fastai export: "
                              "it lacks the classes and preprocessing the server needs; save the Learner with "
                              "learn.export()")
    if "OrderedDict" in names or "torch._utils" in names:
        return ModelLoadError(f"{path} holds only weights (learn.save() or torch.save(model.state_dict())), not a "
                              "fastai export: the server needs the whole Learner, which learn.export() writes")
    return None


def check_model_file(path: Path, expected_sha256: str | None) -> str:
    """Check that `path` plausibly is a fastai export; return its sha256."""
    if not path.is_file():
        raise _missing(path)
    with open(path, "rb") as f:
        head = f.read(1024)
    if looks_like_html(head):
        raise ModelLoadError(f"{path} is an HTML page, not a model: a web page (a GitHub, Jupyter or file-sharing "
                             "page) was saved in place of the file; download the file itself (on GitHub, its Raw "
                             "link) and set MODEL_PATH to it")
    if head.startswith(_LFS_POINTER):
        raise ModelLoadError(f"{path} is a Git LFS pointer, not the model itself: run `git lfs pull` in its "
                             "repository (or download the file directly)")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise ModelLoadError(f"{path} is not a fastai export (not a torch pickle): create it with learn.export()")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is truncated or corrupt (its zip archive has no end): copy or download it "
                             "again, and compare its sha256 with the original's")
    wrong_kind = _not_an_export(path) if head.startswith(_ZIP_MAGIC) else None
    if wrong_kind is not None:
        raise wrong_kind
    actual = sha256_file(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise sha_error(path, actual, expected_sha256.lower())
    return actual


def read_model_card(model_path: Path) -> dict[str, Any] | None:
    """The `model-card.json` next to an export, if there is a readable one."""
    card_path = model_path.with_name("model-card.json")
    try:
        return json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None


def open_model_file(path: Path, expected_sha256: str | None = None) -> ModelFile:
    """A checked `ModelFile` for an export already on disk, with its card if that was written for it."""
    sha256 = check_model_file(path, expected_sha256)
    card = read_model_card(path)
    written_for = card.get("export_sha256") if isinstance(card, dict) else None
    if isinstance(written_for, str) and written_for != sha256:
        # A folder put together by hand (a new export beside the old model's files) must not
        # describe one model with another's figures.
        raise ModelLoadError(f"model-card.json beside {path.name} was made for another export (sha256 "
                             f"{written_for[:12]}, not {sha256[:12]}): copy the card made with this export, "
                             "or remove it")
    return ModelFile(path, sha256, card)
