"""The functions an export refers to, supplied from a Python file (MODEL_CODE, or `--code`).

An export pickles a notebook's own functions by reference, by module and name: `__main__.is_cat`
for a label function defined in the notebook itself (lesson 1), `utils.label_func` for one
imported from the notebook's utils.py. Unpickling needs them under those names, so the file runs
once as a module named after it (utils.py: `utils`), and the functions and classes it defines are
also set on `__main__` (never replacing a name `__main__` already has). Like the export, the file
is code that runs in the server: use only files you wrote or trust.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from app.core.model_file import ModelLoadError

log = logging.getLogger(__name__)
_provided: dict[Path, ModuleType] = {}


def provide(path: Path) -> ModuleType:
    """Run `path` (once per process) and make its definitions importable as the pickle expects."""
    path = path.resolve()
    if path in _provided:
        return _provided[path]
    if not path.is_file():
        raise ModelLoadError(f"MODEL_CODE {path} not found: give the Python file that defines the export's functions")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"MODEL_CODE {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the file's own error, in one line
        del sys.modules[name]
        raise ModelLoadError(f"MODEL_CODE {path} failed to run ({type(exc).__name__}: {exc})") from None
    main = sys.modules["__main__"]
    for key, value in vars(module).items():
        if getattr(value, "__module__", None) == name and not hasattr(main, key):
            setattr(main, key, value)
    log.info("made the definitions in %s importable as %s and __main__", path, name)
    _provided[path] = module
    return module
