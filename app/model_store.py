"""Getting a fastai export onto disk and into memory, with a clear reason when that fails.

Every failure here is a `ModelLoadError` whose message is one line that says what is wrong and
what to do: the server prints it and stops instead of serving a broken model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("app.model")

# torch.save() writes a zip archive; very old exports are a bare pickle stream (protocol >= 2).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


class ModelLoadError(Exception):
    """The model cannot be served; the message is the one line an operator needs."""


@dataclass(frozen=True)
class ModelFile:
    """An export on disk that passed the cheap checks (present, not HTML, the expected hash)."""

    path: Path
    sha256: str
    card: dict | None


@dataclass(frozen=True)
class LoadedModel:
    file: ModelFile
    learn: Any
    vocab: list[str]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:512].lower()
    return start.startswith((b"<!doctype", b"<html", b"<head", b"<?xml")) or b"<html" in start


def check_model_file(path: Path, expected_sha256: str | None) -> str:
    """Check that `path` plausibly is a fastai export; return its sha256."""
    if not path.is_file():
        raise ModelLoadError(
            f"model file {path} not found: train one with `python -m app.train DATA`, "
            "or set MODEL_PATH to an export.pkl (or MODEL_URL to download one)"
        )
    with open(path, "rb") as f:
        head = f.read(1024)
    if looks_like_html(head):
        raise _html_error(path)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise ModelLoadError(f"{path} is not a fastai export (not a torch pickle): create it with learn.export()")
    actual = sha256_file(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise _sha_error(path, actual, expected_sha256.lower())
    return actual


def _html_error(where: object) -> ModelLoadError:
    return ModelLoadError(
        f"{where} is an HTML page, not a model: the link was probably a share page "
        "(Google Drive, Dropbox...); use a direct download link in MODEL_URL"
    )


def _sha_error(where: object, actual: str, expected: str) -> ModelLoadError:
    return ModelLoadError(
        f"{where} has sha256 {actual} but MODEL_SHA256 is {expected}: "
        "the file is corrupt or not the model you meant; fix MODEL_SHA256 or the file"
    )


async def download_model(url: str, dest: Path, expected_sha256: str | None = None, timeout_s: float = 600) -> None:
    """Download `url` to `dest` via a temporary file, renamed into place only when complete and
    checked, so a crash or a wrong link never leaves a half-written or bogus model behind."""
    import aiohttp

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading model from %s", url)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        raise ModelLoadError(f"downloading MODEL_URL {url} failed: HTTP {resp.status}")
                    digest, head = hashlib.sha256(), b""
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        if len(head) < 1024:
                            head += chunk[:1024]
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if looks_like_html(head):
            raise _html_error(f"MODEL_URL {url}")
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise _sha_error(f"MODEL_URL {url}", digest.hexdigest(), expected_sha256)
        os.replace(tmp, dest)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ModelLoadError(f"downloading MODEL_URL {url} failed: {exc or type(exc).__name__}") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_model_card(model_path: Path) -> dict | None:
    card_path = model_path.with_name("model-card.json")
    try:
        return json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None


def _version_hint(card: dict | None) -> str:
    import fastai
    import torch

    installed = f"installed: fastai {fastai.__version__}, torch {torch.__version__}"
    trained = (card or {}).get("versions")
    if trained:
        return f"{installed}; trained with fastai {trained.get('fastai')}, torch {trained.get('torch')}"
    return installed


def load_learner_checked(path: Path, card: dict | None) -> Any:
    """`load_learner(path, cpu=True)`, turning unpickling failures into an actionable message."""
    from fastai.learner import load_learner

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fastai's pickle-safety notice, torch deprecations
            try:
                learn = load_learner(path, cpu=True)
            except UnboundLocalError:
                # fastai swallows most ImportErrors and then trips over an unset variable; unpickle
                # again without it to surface the real error.
                import torch

                torch.load(path, map_location="cpu", weights_only=False)
                raise
    except (AttributeError, ModuleNotFoundError, ImportError, TypeError) as exc:
        raise ModelLoadError(
            f"{path} could not be unpickled ({type(exc).__name__}: {exc}): the export needs code or "
            f"versions this server lacks ({_version_hint(card)}); install the fastai and torch versions "
            "it was trained with, and make any custom functions it uses importable"
        ) from None
    except Exception as exc:  # corrupt archives raise RuntimeError, UnpicklingError, EOFError...
        raise ModelLoadError(f"{path} is not a loadable fastai export ({type(exc).__name__}: {exc})") from None
    if not hasattr(learn, "dls") or not hasattr(learn, "model"):
        raise ModelLoadError(f"{path} holds a {type(learn).__name__}, not a fastai Learner from learn.export()")
    learn.model.eval()
    return learn


def same_release(a: str | None, b: str | None) -> bool:
    """Whether two version strings name the same release, ignoring the local build label
    (`2.14.1+cpu` and `2.14.1+cu130` are the same torch: the build variant does not change what an
    export means)."""
    return a is not None and b is not None and a.split("+")[0] == b.split("+")[0]


def warn_on_version_drift(card: dict | None) -> None:
    import fastai
    import torch

    trained = (card or {}).get("versions") or {}
    if trained and not (same_release(trained.get("fastai"), fastai.__version__)
                        and same_release(trained.get("torch"), torch.__version__)):
        log.warning("model was trained with different versions than installed (%s); "
                    "pin the same versions if predictions look wrong", _version_hint(card))


async def fetch_model_file(model_path: Path, model_url: str | None, expected_sha256: str | None) -> ModelFile:
    """Download the export if it is missing and a URL is set, then check it."""
    if not model_path.exists() and model_url:
        await download_model(model_url, model_path, expected_sha256)
    sha256 = check_model_file(model_path, expected_sha256)
    return ModelFile(model_path, sha256, read_model_card(model_path))


def load_learner_from(file: ModelFile) -> LoadedModel:
    """Unpickle the learner (slow: imports torch and fastai) and read its class vocabulary."""
    learn = load_learner_checked(file.path, file.card)
    warn_on_version_drift(file.card)
    vocab = [str(label) for label in getattr(learn.dls, "vocab", [])]
    if not vocab:
        raise ModelLoadError(f"{file.path} has no class vocabulary: only classifiers can be served")
    return LoadedModel(file, learn, vocab)
