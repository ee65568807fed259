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
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from app.model_store import ModelFile, sha256_file
from app.predictor import ACTIVATIONS, FastPreprocess, Predictor, onnx_cache_path, onnx_runner, write_atomically

log = logging.getLogger("app.compiled")

# Bump when the meaning of a manifest field changes, so that older manifests are not trusted.
MANIFEST_FORMAT = 1
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
    format: int = MANIFEST_FORMAT

    def serves_like(self, other: Manifest) -> bool:
        """Would both manifests give the same answers? (The ONNX bytes may differ between exports.)"""
        return (self.vocab, self.preprocess, self.activation) == (other.vocab, other.preprocess, other.activation)


@dataclass(frozen=True)
class CompiledModel:
    predictor: Predictor
    vocab: list[str]
    manifest: Manifest


def manifest_path(file: ModelFile) -> Path:
    cache = onnx_cache_path(file.path, file.sha256)
    return cache.with_name(cache.name + ".json")


def installed_versions() -> dict[str, str]:
    # Package metadata, not imports: reading it must not cost the seconds this module saves.
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def manifest_for(file: ModelFile, predictor: Predictor, vocab: list[str]) -> Manifest | None:
    """The manifest of a predictor built from the learner, or None if it needs torch or fastai to run
    (fastai preprocessing, the torch backend, a custom activation, or no ONNX file kept on disk)."""
    if (predictor.onnx_path is None or not isinstance(predictor.prepare, FastPreprocess)
            or predictor.activation not in ACTIVATIONS):
        return None
    return Manifest(export_sha256=file.sha256, onnx_sha256=sha256_file(predictor.onnx_path), vocab=list(vocab),
                    preprocess=predictor.prepare.spec(), activation=predictor.activation,
                    versions=installed_versions())


def save_manifest(file: ModelFile, manifest: Manifest) -> None:
    """Record that this compiled model answered like its learner. Best effort: a read-only model
    folder only means later starts take the full path too."""
    try:
        write_atomically(manifest_path(file), json.dumps(asdict(manifest), indent=2).encode())
    except OSError as exc:
        log.info("not recording the compiled model's check (%s): later starts will load the learner first", exc)


def load_compiled(file: ModelFile, threads: int) -> CompiledModel | None:
    """The compiled model recorded for exactly this export and these versions, or None."""
    path = manifest_path(file)
    if not path.exists():
        return None
    try:
        manifest = Manifest(**json.loads(path.read_text()))
        if manifest.format != MANIFEST_FORMAT or manifest.export_sha256 != file.sha256:
            raise ValueError("it was written for another export or by another version of this service")
        if manifest.versions != installed_versions():
            raise ValueError(f"it was checked with other library versions ({manifest.versions})")
        onnx_path = onnx_cache_path(file.path, file.sha256)
        if sha256_file(onnx_path) != manifest.onnx_sha256:
            raise ValueError(f"{onnx_path.name} changed since it was checked")
        prepare = FastPreprocess.from_spec(manifest.preprocess)
        to_probs = ACTIVATIONS[manifest.activation]
        run = onnx_runner(onnx_path, threads)
    except Exception as exc:  # anything unexpected: take the full path, which rewrites the manifest
        log.info("not using %s: %s", path.name, exc)
        return None

    def infer(batch: np.ndarray) -> np.ndarray:
        return to_probs(run(batch))

    predictor = Predictor(prepare=prepare, infer=infer, backend="onnx", preprocessing="pillow-numpy",
                          draft_size=prepare.draft_size, activation=manifest.activation, onnx_path=onnx_path)
    return CompiledModel(predictor, list(manifest.vocab), manifest)
