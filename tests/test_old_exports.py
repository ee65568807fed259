"""Exports made with fastai 2.0-2.7: refused by the server with the one command that makes them
servable, compiled with that fastai (`app.compile --fastai`), then served with its answers.

The export in tests/old_exports/ was made by tests/old_exports/make_exports.py under fastai 2.7.19,
which also recorded that fastai's `learn.predict` probabilities on the probe images below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import ROOT, AppProcess, image_bytes

sys.path.insert(0, str(ROOT / "tests" / "old_exports"))
from make_exports import probe_images  # noqa: E402 - the images the expectations were recorded on

OLD = ROOT / "tests" / "old_exports"
EXPECTED = json.loads((OLD / "expected.json").read_text())
EXPORT = OLD / EXPECTED["tiny"]["file"]
IS_CAT = OLD / EXPECTED["is_cat"]["file"]


def test_the_server_names_the_command_that_makes_an_old_export_servable():
    done = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MODEL_PATH": str(EXPORT)}, timeout=120)
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    assert "was exported with fastai 2.0-2.7" in line and "this server has fastai 2.8" in line
    assert f"python -m app.compile {EXPORT} --out model-bundle --fastai 2.7.19" in line


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A cache folder of this module's own: the first compile makes the fastai 2.7 environment."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


def compile_old(export: Path, out: Path, env: dict[str, str], *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.compile", str(export), "--out", str(out), "--fastai", "2.7.19",
                           *more], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory: pytest.TempPathFactory, cache: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("old") / "bundle"
    done = compile_old(EXPORT, out, cache)
    assert done.returncode == 0, done.stderr
    assert "making an environment with fastai 2.7.19" in done.stdout and "bundle written" in done.stdout
    return out


def served_probs(bundle: Path, log: Path, vocab: list[str]) -> list[np.ndarray]:
    """What a real server on `bundle` answers for the probe images, in vocab order."""
    app = AppProcess({"MODEL_PATH": str(bundle)}, log).wait_ready()
    try:
        assert requests.get(app.url + "/model").json()["bundle"]["versions"]["fastai"] == "2.7.19"
        answers = []
        for img in probe_images():
            body = requests.post(app.url + "/upload", files={"file": ("p.png", image_bytes(img, "PNG"))}).json()
            got = dict(body["predictions"])
            answers.append(np.array([got[label] for label in vocab]))
        return answers
    finally:
        app.stop()


def test_compiled_with_its_own_fastai_and_checked_against_its_learn_predict(old_bundle):
    manifest = json.loads((old_bundle / "manifest.json").read_text())
    assert manifest["versions"]["fastai"] == "2.7.19" and manifest["versions"]["fastcore"].startswith("1.")
    assert manifest["classes"] == EXPECTED["tiny"]["vocab"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-5


def test_the_bundle_serves_fastai_2_7s_answers(old_bundle, tmp_path):
    served = served_probs(old_bundle, tmp_path / "server.log", EXPECTED["tiny"]["vocab"])
    for got, expected in zip(served, EXPECTED["tiny"]["probs"], strict=True):
        assert np.abs(got - np.array(expected)).max() <= 2e-6, (got, expected)


def test_lesson_ones_label_function_comes_from_code(cache, tmp_path):
    """fastai 2.7 pickled the notebook's is_cat as __main__.is_cat: --code supplies it."""
    refused = compile_old(IS_CAT, tmp_path / "refused", cache)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "refers to is_cat, defined in the notebook that trained it (__main__)" in line and "--code" in line

    code = tmp_path / "lesson_one.py"
    code.write_text("def is_cat(x):\n    return x[0].isupper()\n")
    done = compile_old(IS_CAT, tmp_path / "bundle", cache, "--code", str(code))
    assert done.returncode == 0, done.stderr
    served = served_probs(tmp_path / "bundle", tmp_path / "server.log", EXPECTED["is_cat"]["vocab"])
    for got, expected in zip(served, EXPECTED["is_cat"]["probs"], strict=True):
        assert np.abs(got - np.array(expected)).max() <= 2e-6, (got, expected)


def test_a_version_that_is_not_an_old_fastai_2_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "app.compile", str(EXPORT), "--out", str(tmp_path / "b"),
                           "--fastai", "1.0.61"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "before 2.8" in done.stderr


def test_the_committed_exports_are_tiny_and_their_script_is_beside_them():
    assert EXPORT.stat().st_size < 100_000 and IS_CAT.stat().st_size < 100_000
    assert "learn.export(" in (OLD / "make_exports.py").read_text()
