"""Which bundle the default image serves, decided from the model folder the build was given.

    python choose_bundle.py MODEL_DIR [fp32|int8]   (the Dockerfile's bundle stage runs it, before installing anything)

Prints one path: MODEL_DIR itself if it is a bundle; MODEL_DIR/bundle if `python -m app.train` left
a checked bundle there that was compiled from MODEL_DIR/export.pkl (then torch is never installed);
else MODEL_DIR/export.pkl, to be compiled and checked at build time. With `int8`: MODEL_DIR/bundle-int8,
which must be there (an INT8 bundle is calibrated and measured on the training photos, which a build
does not have). Exits 1 with one line on stderr for a folder that holds no model, or holds files
made for another export than its `export.pkl` (a new export copied over an old model's folder): a
stale bundle, detector or card.

Standard library only: it runs in the bare Python image, so that deciding costs no install. It reads
the same files as `app.core.bundle` and `app.core.detector` (`tests/test_deploy.py` checks that the
names and fields agree).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
EXPORT = "export.pkl"
DETECTOR = "export.detector.npz"
BUNDLES = {"fp32": "bundle", "int8": "bundle-int8"}
CARD = "model-card.json"


class WrongFolder(Exception):
    """The folder cannot give the image a model it can trust."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def detector_export(path: Path) -> str | None:
    """The export a detector file was fitted for: its `meta` array holds one JSON string (UTF-32)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("meta.npy")
    size_bytes = 2 if data[6] == 1 else 4  # .npy format 1.0 has a 2-byte header length, 2.0 and 3.0 four
    header_end = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    return json.loads(data[header_end:].decode("utf-32-le").rstrip("\0")).get("export_sha256")


def choose(folder: Path, precision: str = "fp32") -> Path:
    if (folder / MANIFEST).is_file():
        return folder
    export = folder / EXPORT
    if not export.is_file():
        raise WrongFolder(f"{folder} holds neither {EXPORT} nor a bundle ({MANIFEST}): name the folder "
                          "python -m app.train wrote")
    sha = sha256_of(export)
    written_for = {}
    if (folder / CARD).is_file():
        written_for[CARD] = json.loads((folder / CARD).read_text()).get("export_sha256")
    if (folder / DETECTOR).is_file():
        written_for[DETECTOR] = detector_export(folder / DETECTOR)
    for bundle in BUNDLES.values():
        if (folder / bundle / MANIFEST).is_file():
            manifest = json.loads((folder / bundle / MANIFEST).read_text())
            written_for[f"{bundle}/{MANIFEST}"] = manifest.get("source", {}).get("sha256")
    for name, other in written_for.items():
        if other is not None and other != sha:
            raise WrongFolder(f"{folder / name} was made for another export (sha256 {other[:12]}, not "
                              f"{sha[:12]} of {EXPORT}): copy the files made with this export, or remove it")
    bundle = BUNDLES[precision]
    if f"{bundle}/{MANIFEST}" in written_for:
        return folder / bundle
    if precision == "int8":
        raise WrongFolder(f"{folder} has no INT8 bundle ({bundle}/): make it where the training photos are, with "
                          f"python -m app.compile {folder}/{EXPORT} --int8 --calibration DATA --out {folder}/{bundle}")
    return export


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["fp32"], ["int8"]):
        print("usage: python choose_bundle.py MODEL_DIR [fp32|int8]", file=sys.stderr)
        return 2
    try:
        chosen = choose(Path(argv[0]), *argv[1:])
    except (WrongFolder, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    how = "compiling it here (installing torch)" if chosen.name == EXPORT else "taking it as it is (no torch)"
    print(f"model: {chosen}, {how}", file=sys.stderr)
    print(chosen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
