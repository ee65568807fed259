"""A virtual environment with an older fastai 2 release, made once and cached, in which
`python -m app.compile --fastai VERSION` compiles an export this project's fastai cannot load.

Only fastai and the few packages whose newer releases need a newer fastcore are installed in it
(with `--no-deps`); everything else, torch and ONNX Runtime included, comes from this project's
own environment through a `.pth` file, so the bundle is compiled and checked against the same
torch the rest of the project uses, and the environment costs megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from app.building.cli import UsageError
from app.core.files import user_cache_dir

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = re.compile(r"^2\.[0-7]\.\d+$")
# The releases of fastai's helpers from before they required fastcore 1.8 (fastprogress 1.1
# imports fasthtml, which needs a newer fastcore than fastai 2.7 allows).
HELPERS = ("fastprogress==1.0.3", "fastdownload==0.0.7")
READY = "cuddle-or-not-env.json"


def env_dir(version: str) -> Path:
    return user_cache_dir() / f"fastai-{version}"


def python_in(folder: Path) -> Path:
    return folder / "bin" / "python"


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"{what} failed: {last}")
    return done.stdout


def ensure_env(version: str) -> Path:
    """The interpreter of the environment with fastai `version`, made if need be; UsageError if
    the version is not one this serves or cannot be installed."""
    if not SUPPORTED.match(version):
        raise UsageError(f"--fastai {version}: give a fastai 2 release before 2.8, such as 2.7.19 (exports of fastai "
                         "2.8 and later are compiled without --fastai)")
    folder = env_dir(version)
    if (folder / READY).is_file():
        return python_in(folder)
    print(f"making an environment with fastai {version} in {folder} (once)", flush=True)
    building = folder.with_name(folder.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run([base_python, "-m", "venv", str(building)], "creating a virtual environment")
    python = str(python_in(building))
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps"]
    _run([*pip, f"fastai=={version}", *HELPERS], f"pip install fastai=={version}")
    # The fastcore that fastai release asks for, from its own metadata.
    requires = _run([python, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('fastai')))"],
                    "reading fastai's requirements")
    fastcore = next((r.split(";")[0].replace(" ", "") for r in requires.splitlines() if r.startswith("fastcore")),
                    "fastcore<1.8")
    _run([*pip, fastcore], f"pip install {fastcore}")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     "locating the environment's packages").strip())
    # After the environment's own packages: this project and its environment's (torch, ONNX...).
    (site / "cuddle-or-not.pth").write_text(f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n")
    versions = _run([python, "-c", "import fastai, fastcore; print(fastai.__version__, fastcore.__version__)"],
                    f"importing fastai {version}").split()
    (building / READY).write_text(json.dumps({"fastai": versions[0], "fastcore": versions[1]}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    return python_in(folder)


def compile_with(version: str, argv: list[str]) -> int:
    """Run `python -m app.compile ARGV` (without --fastai) in the environment with fastai `version`."""
    python = ensure_env(version)
    return subprocess.run([str(python), "-m", "app.compile", *argv], cwd=ROOT).returncode
