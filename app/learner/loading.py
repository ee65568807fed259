"""Unpickling an exported fastai learner (importing torch and fastai), with a one-line
`ModelLoadError` that says what to do when it cannot be loaded."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.model_file import ModelFile, ModelLoadError
from app.learner.code import provide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    file: ModelFile
    learn: Any
    vocab: list[str]


def _version_hint(card: dict[str, Any] | None) -> str:
    import fastai
    import torch

    installed = f"installed: fastai {fastai.__version__}, torch {torch.__version__}"
    trained = (card or {}).get("versions")
    if trained:
        return f"{installed}; trained with fastai {trained.get('fastai')}, torch {trained.get('torch')}"
    return installed


def load_learner_checked(path: Path, card: dict[str, Any] | None) -> Any:
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
    except ModuleNotFoundError as exc:
        # A package from a registry (timm, ...) or the training notebook's own module: both read alike.
        top = (exc.name or "?").split(".")[0]
        raise ModelLoadError(
            f"{path} needs the module {exc.name!r}, which is not installed here ({_version_hint(card)}): if it "
            f"is a package, pip install {top} (the version the model was trained with); if it holds the export's "
            f"own functions ({exc.name}.py beside the notebook), set MODEL_CODE to that file (or make it importable: "
            "PYTHONPATH); if it belongs to another fastai or torch, install the versions the model was trained "
            "with") from None
    except AttributeError as exc:
        missing = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(exc))
        if missing:
            name, module = missing.groups()
            # Python names __main__ by its spec: `python -m app.compile` shows it as app.compile.
            main_spec = getattr(sys.modules["__main__"], "__spec__", None)
            in_main = module in ("__main__", getattr(main_spec, "name", None))
            where = "the notebook that trained it (__main__)" if in_main else f"the module {module}"
            raise ModelLoadError(
                f"{path} refers to {name}, defined in {where}: put that definition in a Python file and set "
                "MODEL_CODE=that-file.py (--code for app.compile and app.evaluate)") from None
        raise ModelLoadError(
            f"{path} could not be unpickled ({type(exc).__name__}: {exc}): the export needs code or "
            f"versions this server lacks ({_version_hint(card)}); install the fastai and torch versions "
            "it was trained with, and make any custom functions it uses importable (MODEL_CODE)"
        ) from None
    except (ImportError, TypeError) as exc:
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


def warn_on_version_drift(card: dict[str, Any] | None) -> None:
    import fastai
    import torch

    trained = (card or {}).get("versions") or {}
    if trained and not (same_release(trained.get("fastai"), fastai.__version__)
                        and same_release(trained.get("torch"), torch.__version__)):
        log.warning("model was trained with different versions than installed (%s); "
                    "pin the same versions if predictions look wrong", _version_hint(card))


def load_learner_from(file: ModelFile, code: Path | None = None) -> LoadedModel:
    """Unpickle the learner (slow: imports torch and fastai) and read its class vocabulary; `code`:
    a Python file defining the functions it refers to (`app.learner.code`)."""
    if code is not None:
        provide(code)
    learn = load_learner_checked(file.path, file.card)
    warn_on_version_drift(file.card)
    vocab = [str(label) for label in getattr(learn.dls, "vocab", [])]
    if not vocab:
        raise ModelLoadError(f"{file.path} has no class vocabulary: only classifiers can be served")
    return LoadedModel(file, learn, vocab)
