"""A compiled model that has been checked against its learner, so a restart can serve it without
importing torch or fastai.

Importing torch and fastai and unpickling the learner take most of a start (about 9 s of 10 on a
2-core machine). Once the full start-up self-check has passed, a manifest is written next to the ONNX
cache: the export's sha256, the ONNX file's sha256, the class vocabulary, the preprocessing and
activation read from the learner, and the library versions that produced them. A later start of the
same export with the same versions serves from ONNX Runtime, Pillow and NumPy alone. Anything that
does not match exactly (another export, another version, a modified ONNX file, an unreadable
manifest) means the full start-up path instead, never a guess.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from app.core.files import private_temp_dir, sha256_file, writable, write_atomically
from app.core.model_file import ModelFile
from app.core.preprocess import FastPreprocess
from app.core.runner import ACTIVATIONS, Predictor, inference, onnx_cache_path, onnx_runner

log = logging.getLogger(__name__)

# Bump when the meaning of a manifest field changes, so that older manifests are not trusted.
MANIFEST_FORMAT = 3
# Everything that shapes what the learner predicts or how its preprocessing is reproduced.
VERSIONED_PACKAGES = ("fastai", "fastcore", "torch", "torchvision", "onnxruntime", "numpy", "pillow")


@dataclass(frozen=True)
class Manifest:
    export_sha256: str
    onnx_sha256: str
    vocab: list[str]
    preprocess: dict[str, Any]
    activation: str
    versions: dict[str, str]
    features: bool = False  # the ONNX graph also outputs the detector's pooled features
    threshold: float | None = None  # a multi-label model's decision threshold (`Predictor.threshold`)
    raw_scores: bool = False  # learn.predict gives raw scores (`Predictor.raw_scores`)
    format: int = MANIFEST_FORMAT

    def serves_like(self, other: Manifest) -> bool:
        """Would both manifests give the same answers? (The ONNX bytes may differ between exports.)"""
        return ((self.vocab, self.preprocess, self.activation, self.threshold)
                == (other.vocab, other.preprocess, other.activation, other.threshold))


@dataclass(frozen=True)
class CompiledModel:
    predictor: Predictor
    vocab: list[str]
    manifest: Manifest


def manifest_path(onnx_path: Path) -> Path:
    """The record of a compiled model's check sits next to it."""
    return onnx_path.with_name(onnx_path.name + ".json")


@dataclass(frozen=True)
class CacheDirs:
    """Where compiled models are looked for, in order, and where a new one is written."""

    lookup: tuple[Path, ...]
    write: Path | None
    fallback_note: str | None = None  # why `write` is not the configured or model folder, if it is not


def cache_dirs(model_path: Path, configured: Path | None) -> CacheDirs:
    """CACHE_DIR if set, then the export's own folder; if neither is writable, a private temporary
    folder (which a new container does not keep)."""
    candidates = [*([configured] if configured else []), model_path.parent]
    write = next((d for d in candidates if writable(d)), None)
    note = None
    if write is None:
        write = private_temp_dir()
        which = f"CACHE_DIR {configured}" if configured else f"the model folder {model_path.parent}"
        note = (f"{which} is not writable by uid {os.getuid()}: the compiled model is kept in {write} instead, "
                "which a new container does not keep, so each new container loads the learner before it is ready "
                "(about 10 s instead of 1 s); set CACHE_DIR to a writable, persistent folder or make the model "
                "folder writable (see README, Deploy)")
    lookup = tuple(dict.fromkeys(d for d in [*candidates, write] if d is not None))
    return CacheDirs(lookup, write, note)


def installed_versions() -> dict[str, str]:
    # Package metadata, not imports: reading it must not cost the seconds this module saves.
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def manifest_for(file: ModelFile, predictor: Predictor, vocab: list[str], with_features: bool) -> Manifest | None:
    """The manifest of a predictor built from the learner, or None if it needs torch or fastai to run
    (fastai preprocessing, the torch backend, a custom activation, or no ONNX file kept on disk)."""
    if (predictor.onnx_path is None or not isinstance(predictor.prepare, FastPreprocess)
            or predictor.activation not in ACTIVATIONS):
        return None
    return Manifest(export_sha256=file.sha256, onnx_sha256=sha256_file(predictor.onnx_path), vocab=list(vocab),
                    preprocess=predictor.prepare.spec(), activation=predictor.activation,
                    versions=installed_versions(), features=with_features, threshold=predictor.threshold,
                    raw_scores=predictor.raw_scores)


def save_manifest(onnx_path: Path, manifest: Manifest) -> None:
    """Record that this compiled model answered like its learner. Best effort: a read-only model
    folder only means later starts take the full path too."""
    try:
        write_atomically(manifest_path(onnx_path), json.dumps(asdict(manifest), indent=2).encode())
    except OSError as exc:
        log.info("not recording the compiled model's check (%s): later starts will load the learner first", exc)


def load_compiled(file: ModelFile, folders: tuple[Path, ...], threads: int,
                  with_features: bool) -> CompiledModel | None:
    """The compiled model recorded for exactly this export and these versions in the first of
    `folders` that has one, or None."""
    for folder in folders:
        compiled = _load_compiled_from(folder, file, threads, with_features)
        if compiled is not None:
            return compiled
    return None


def _load_compiled_from(folder: Path, file: ModelFile, threads: int, with_features: bool) -> CompiledModel | None:
    onnx_path = onnx_cache_path(file.path, file.sha256, with_features, folder)
    path = manifest_path(onnx_path)
    if not path.exists():
        return None
    try:
        manifest = Manifest(**json.loads(path.read_text()))
        if (manifest.format != MANIFEST_FORMAT or manifest.export_sha256 != file.sha256
                or manifest.features != with_features):
            raise ValueError("it was written for another export or by another version of this service")
        if manifest.versions != installed_versions():
            raise ValueError(f"it was checked with other library versions ({manifest.versions})")
        if sha256_file(onnx_path) != manifest.onnx_sha256:
            raise ValueError(f"{onnx_path.name} changed since it was checked")
        prepare = FastPreprocess.from_spec(manifest.preprocess)
        to_probs = ACTIVATIONS[manifest.activation]
        run = onnx_runner(onnx_path, threads)
    except Exception as exc:  # anything unexpected: take the full path, which rewrites the manifest
        log.info("not using %s: %s", path.name, exc)
        return None

    predictor = Predictor(prepare=prepare, infer=inference(run, to_probs), backend="onnx", preprocessing="pillow-numpy",
                          draft_size=prepare.draft_size, activation=manifest.activation, onnx_path=onnx_path,
                          threshold=manifest.threshold, raw_scores=manifest.raw_scores)
    return CompiledModel(predictor, list(manifest.vocab), manifest)
