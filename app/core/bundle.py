"""A checked model bundle: a folder that serves a classifier without torch or fastai.

`python -m app.compile EXPORT --out DIR` (and `python -m app.train`) writes it: the compiled model
(`model.onnx`, logits and, for a model with a detector, pooled features), the unfamiliar-image
detector (`detector.npz`), and `manifest.json` with the classes, the preprocessing, the activation,
the source export's sha256, the library versions it was made with, the parity evidence against
`learn.predict`, and the sha256 of every file. A bundle that cannot be trusted is never served:
`load_bundle` checks all of it and says in one line what is wrong and what to do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from app.core.detector import Detector, DetectorError
from app.core.files import sha256_file, write_atomically
from app.core.model_file import ModelFile, ModelLoadError
from app.core.preprocess import FastPreprocess
from app.core.runner import ACTIVATIONS, Predictor, inference, onnx_runner

# Bump when the meaning of a manifest field changes: a server never guesses at another format.
# 2 added `precision`, `quantization`, `agreement` and `raw_scores`; a format 1 bundle is FP32, of
# a learner with an activation, and is still read.
BUNDLE_FORMAT = 2
READ_FORMATS = (1, BUNDLE_FORMAT)
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
DETECTOR_NAME = "detector.npz"
BUNDLE_FILES = (MANIFEST_NAME, MODEL_NAME, DETECTOR_NAME)
REMAKE = "make it again with python -m app.compile EXPORT --out DIR"


@dataclass(frozen=True)
class BundleManifest:
    classes: list[str]
    preprocess: dict[str, Any]
    activation: str
    outputs: list[str]  # "logits", then "features" when the detector's features come out too
    source: dict[str, Any]  # the export it was compiled from: its file name and sha256
    versions: dict[str, str]  # the libraries it was made and checked with
    parity: dict[str, Any]  # largest probability difference against learn.predict, on which photos
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    card: dict[str, Any] | None = None  # the export's model card, when it had one
    threshold: float | None = None  # a multi-label model's decision threshold (`Predictor.threshold`)
    raw_scores: bool = False  # learn.predict gives raw scores, served as their softmax (`Predictor.raw_scores`)
    precision: str = "fp32"  # "int8": a quantized copy of the FP32 graph (`app.building.int8`)
    quantization: dict[str, Any] | None = None  # int8: how, and the calibration photos
    agreement: dict[str, Any] | None = None  # int8: its answers against the FP32 graph's, on validation photos
    format: int = BUNDLE_FORMAT

    @property
    def source_sha256(self) -> str:
        return str(self.source["sha256"])

    def describe(self) -> dict[str, Any]:
        """What `/model` says about the bundle being served."""
        return {"format": self.format, "precision": self.precision, "source": self.source,
                "versions": self.versions, "parity": self.parity, "quantization": self.quantization,
                "agreement": self.agreement, "files": self.files}


@dataclass(frozen=True)
class LoadedBundle:
    file: ModelFile  # path: the bundle folder; sha256: the source export's
    manifest: BundleManifest
    predictor: Predictor
    detector: Detector | None


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def write_manifest(folder: Path, manifest: BundleManifest) -> None:
    """Written last, once every file it names is in place: its presence marks a complete bundle."""
    write_atomically(folder / MANIFEST_NAME, (json.dumps(asdict(manifest), indent=2) + "\n").encode())


def read_manifest(folder: Path) -> BundleManifest:
    where = folder / MANIFEST_NAME
    try:
        raw = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"bundle {folder}: {MANIFEST_NAME} is unreadable ({exc}); {REMAKE}") from None
    if not isinstance(raw, dict) or raw.get("format") not in READ_FORMATS:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ModelLoadError(f"bundle {folder} is of format {found!r}, this server reads formats "
                             f"{' and '.join(map(str, READ_FORMATS))}: "
                             f"{REMAKE} with this version of Cuddle or Not")
    try:
        return BundleManifest(**raw)
    except TypeError as exc:
        raise ModelLoadError(f"bundle {folder}: {MANIFEST_NAME} does not describe a bundle ({exc}); {REMAKE}") from None


def _check_files(folder: Path, manifest: BundleManifest) -> None:
    needed = [MODEL_NAME, *([DETECTOR_NAME] if "features" in manifest.outputs else [])]
    for name in needed:
        if name not in manifest.files:
            raise ModelLoadError(f"bundle {folder}: its manifest does not list {name}; {REMAKE}")
    for name, expected in manifest.files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise ModelLoadError(f"bundle {folder} is missing {name}: copy the whole bundle folder, or {REMAKE}")
        if sha256_file(path) != expected:
            raise ModelLoadError(f"bundle {folder}: {name} changed since the bundle was made (its sha256 is not the "
                                 f"one in {MANIFEST_NAME}); {REMAKE}")


def _probe(folder: Path, manifest: BundleManifest, prepare: FastPreprocess, predictor: Predictor,
           detector: Detector | None) -> None:
    """One forward pass of a blank image (as the preprocessing makes it, so of the model's size and
    channels): the outputs must fit the classes and the detector."""
    probe = prepare(Image.new("RGB", (64, 48)))[None]
    try:
        probs, features = predictor.infer(probe)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types on a graph that does not fit
        raise ModelLoadError(f"bundle {folder}: {MODEL_NAME} does not run ({type(exc).__name__}: {exc}); "
                             f"{REMAKE}") from None
    if probs.shape != (1, len(manifest.classes)):
        raise ModelLoadError(f"bundle {folder}: {MODEL_NAME} outputs {probs.shape[-1]} classes, its manifest lists "
                             f"{len(manifest.classes)}; {REMAKE}")
    if detector is not None and (features is None or features.shape[-1] != detector.reference.shape[-1]):
        raise ModelLoadError(f"bundle {folder}: {MODEL_NAME} does not output the features its detector compares; "
                             f"{REMAKE}")


def load_bundle(folder: Path, threads: int) -> LoadedBundle:
    """The bundle in `folder`, every part of it checked; `ModelLoadError` with one line if not."""
    manifest = read_manifest(folder)
    _check_files(folder, manifest)
    if manifest.activation not in ACTIVATIONS:
        raise ModelLoadError(f"bundle {folder}: activation {manifest.activation!r} is not one this server runs; "
                             f"{REMAKE}")
    try:
        prepare = FastPreprocess.from_spec(manifest.preprocess)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"bundle {folder}: its preprocessing is not understood ({exc}); {REMAKE}") from None
    detector = None
    if "features" in manifest.outputs:
        try:
            detector = Detector.load(folder / DETECTOR_NAME, manifest.source_sha256)
        except DetectorError as exc:
            raise ModelLoadError(f"bundle {folder}: {exc}; {REMAKE}") from None
    try:
        run = onnx_runner(folder / MODEL_NAME, threads)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors for a file it cannot load
        raise ModelLoadError(f"bundle {folder}: {MODEL_NAME} cannot be loaded ({exc}); {REMAKE}") from None
    predictor = Predictor(prepare=prepare, infer=inference(run, ACTIVATIONS[manifest.activation]), backend="onnx",
                          preprocessing="pillow-numpy", draft_size=prepare.draft_size,
                          activation="softmax" if manifest.activation == "softmax" else "sigmoid",
                          onnx_path=folder / MODEL_NAME, threshold=manifest.threshold,
                          raw_scores=manifest.raw_scores)
    _probe(folder, manifest, prepare, predictor, detector)
    return LoadedBundle(ModelFile(folder, manifest.source_sha256, manifest.card), manifest, predictor, detector)
