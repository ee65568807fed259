"""Run `python -m app` with some top-level packages made unimportable, as if not installed.

    python tests/without_modules.py torch,fastai [app arguments...]

A meta-path finder that raises ImportError for them is put first, so neither the project nor any
library can import them, however indirectly; then `app` runs as `python -m app` would.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys
from pathlib import Path


class Unimportable(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"No module named {fullname!r} (made unimportable for this test)")
        return None


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the project, as `python -m app` has it
    blocked = set(sys.argv[1].split(","))
    sys.meta_path.insert(0, Unimportable(blocked))
    sys.argv = ["app", *sys.argv[2:]]
    runpy.run_module("app", run_name="__main__", alter_sys=True)
