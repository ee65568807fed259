"""Loading a learner and checking its compiled copy in a process of its own.

The server starts this as a child process (`python -m app.learner.check`), so that torch and
fastai, about 1 GB of memory once imported, never stay in the serving process: the child loads the
learner, builds the fast predictor, checks it against the learner, records the passing check next
to the compiled model (`app.core.compiled`), prints one JSON line and exits. The server then serves
the recorded compiled model. Its argument is one JSON object:
`{"model": PATH, "sha256": HEX, "cache_dir": PATH, "threads": N, "backend": "auto", "with_features": BOOL,
"code": PATH or null, "log_level": "info", "log_format": "text"}`; its answer
`{"manifest": {...} or null, "error": null or "one line"}` (no manifest: this model needs torch or
fastai to serve, so the server loads it itself).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.core.compiled import Manifest, manifest_for, save_manifest
from app.core.files import ensure_matplotlib_config_dir
from app.core.logs import configure_logging
from app.core.model_file import ModelFile, ModelLoadError, read_model_card
from app.core.runner import BackendChoice, Predictor, onnx_cache_path
from app.learner.compile import build_predictor
from app.learner.loading import LoadedModel, load_learner_from


def checked_predictor(model: LoadedModel, threads: int, backend: BackendChoice, with_features: bool,
                      cache_dir: Path | None) -> tuple[Predictor, Manifest | None]:
    """The learner's fast predictor, checked against it, and the record of that check, written next
    to the compiled model for later starts (None if the predictor needs torch or fastai to run)."""
    file = model.file
    predictor = build_predictor(model.learn, threads, backend, with_features,
                                onnx_cache_path(file.path, file.sha256, with_features, cache_dir))
    manifest = manifest_for(file, predictor, model.vocab, with_features)
    if manifest is not None and predictor.onnx_path is not None:
        save_manifest(predictor.onnx_path, manifest)
    return predictor, manifest


def check_and_record(file: ModelFile, threads: int, backend: BackendChoice, with_features: bool,
                     cache_dir: Path | None, code: Path | None = None) -> Manifest | None:
    """Load the learner, check the fast predictor against it, record the check; the record, or None
    if the predictor needs torch or fastai to run."""
    return checked_predictor(load_learner_from(file, code), threads, backend, with_features, cache_dir)[1]


def run(request: dict[str, Any]) -> dict[str, Any]:
    path = Path(request["model"])
    file = ModelFile(path, request["sha256"], read_model_card(path))
    cache_dir = Path(request["cache_dir"]) if request.get("cache_dir") else None
    try:
        manifest = check_and_record(file, int(request["threads"]), request["backend"],
                                    bool(request["with_features"]), cache_dir,
                                    Path(request["code"]) if request.get("code") else None)
    except ModelLoadError as exc:
        return {"manifest": None, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure is reported in one line, never a traceback
        return {"manifest": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"manifest": asdict(manifest) if manifest is not None else None, "error": None}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    configure_logging(request.get("log_level", "info"), request.get("log_format", "text"))
    ensure_matplotlib_config_dir()
    answer = run(request)
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
