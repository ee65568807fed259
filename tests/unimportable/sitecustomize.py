"""Makes the packages named in $UNIMPORTABLE (comma-separated; `numpy.f2py` for a sub-package) unimportable, as if not
installed, in every Python process started with this folder on PYTHONPATH: the process itself and
any child it starts (the server's learner check runs in one).

A meta-path finder that raises ImportError for them is put first, so neither the project nor any
library can import them, however indirectly. Used by tests/support.py's AppProcess(without=...)
and bench/memory.py.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class Unimportable(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ImportError(f"No module named {fullname!r} (made unimportable for this test)")
        return None


_names = {name for name in os.environ.get("UNIMPORTABLE", "").split(",") if name}
if _names:
    sys.meta_path.insert(0, Unimportable(_names))
