"""Every kind of fastai image export, served as what it is with `learn.predict`'s answers
(multi-label, grayscale, without a Resize, with the notebook's own functions), and every other kind
of learner refused at start-up with one line (tests/kinds.py makes them, real, in seconds)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
from kinds import REFUSED, make_grayscale, make_multi_label, make_raw_scores, make_without_resize
from support import ROOT, AppProcess, image_bytes, needs_chromium, synthetic_image

PARITY = 2e-6  # the largest probability difference from learn.predict allowed


def check(model: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MODEL_PATH": str(model), **env}, timeout=300)


def probes(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Photos of varied colours and sizes, saved where learn.predict can open them too."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 40, 40), (40, 60, 200), (40, 180, 60), (128, 128, 128), (220, 200, 30)]
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"probe-{i}.png"
        synthetic_image(colours[i % len(colours)], size=size, seed=50 + i).save(path)
        paths.append(path)
    return paths


def learner_answers(export: Path, paths: list[Path]) -> list[tuple[list[str], np.ndarray]]:
    """learn.predict on each photo: its decoded answer (as a list of labels) and probabilities."""
    from fastai.learner import load_learner

    learn = load_learner(export, cpu=True)
    answers = []
    with learn.no_bar():
        for path in paths:
            decoded, _, probs = learn.predict(path)
            labels = list(decoded) if isinstance(decoded, list) or hasattr(decoded, "items") else [str(decoded)]
            answers.append(([str(label) for label in labels], probs.numpy()))
    return answers


def served(app: AppProcess, path: Path) -> dict:
    response = requests.post(app.url + "/upload", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def in_vocab_order(body: dict, vocab: list[str]) -> np.ndarray:
    probs = dict(body["predictions"])
    return np.array([probs[label] for label in vocab])


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {make.__name__.removeprefix("make_"): make(root / make.__name__)
            for make in (make_multi_label, make_grayscale, make_without_resize, make_raw_scores)}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_other_learners_are_refused_with_one_line_naming_what_they_are(kind, tmp_path):
    make, what = REFUSED[kind]
    export = make(tmp_path)
    done = check(export)
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    assert line == f"cannot serve the model: {export} is {what}: only image classifiers are served"


def test_a_truncated_export_is_one_line(tiny_export, tmp_path):
    cut = tmp_path / "export.pkl"
    cut.write_bytes(tiny_export.read_bytes()[: tiny_export.stat().st_size // 2])
    done = check(cut)
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [f"cannot serve the model: {cut} is truncated or corrupt (its zip "
                                                "archive has no end): copy or download it again, and compare its "
                                                "sha256 with the original's"]


def test_a_multi_label_model_answers_with_its_labels_and_threshold(exports, tmp_path):
    export = exports["multi_label"]
    paths = probes(tmp_path / "probes", [(48, 40)] * 5)
    expected = learner_answers(export, paths)
    app = AppProcess({"MODEL_PATH": str(export)}, tmp_path / "server.log").wait_ready()
    try:
        info = requests.get(app.url + "/model").json()
        assert info["multi_label"] is True and info["threshold"] == 0.5
        vocab = info["classes"]
        for path, (labels, probs) in zip(paths, expected, strict=True):
            body = served(app, path)
            assert np.abs(in_vocab_order(body, vocab) - probs).max() <= PARITY
            assert body["labels"] == labels and body["threshold"] == 0.5
            assert [p for _, p in body["predictions"]] == sorted((p for _, p in body["predictions"]), reverse=True)
        # Sigmoid scores, each on its own: nothing makes them sum to 1.
        assert len({round(sum(in_vocab_order(served(app, p), vocab)), 3) for p in paths}) > 1
    finally:
        app.stop()


@needs_chromium
def test_the_page_shows_a_multi_label_models_labels(exports, tmp_path, open_page):
    app = AppProcess({"MODEL_PATH": str(exports["multi_label"])}, tmp_path / "server.log").wait_ready()
    try:
        path = probes(tmp_path / "probes", [(48, 40)])[0]
        expected = served(app, path)
        page = open_page(app.url, width=360)
        page.page.wait_for_function("document.querySelector('#model-description').textContent.includes('Labels')")
        assert "any number of them can apply" in page.page.inner_text("#model-description")
        page.choose((path.name, path.read_bytes(), "image/png"))
        page.wait_done()
        answer = page.page.inner_text(".card .answer")
        assert answer == (", ".join(expected["labels"]) or "None of the labels")
        assert page.page.locator(".bar-row").count() == 5
    finally:
        app.stop()


def test_a_single_label_model_says_so(server):
    info = requests.get(server.url + "/model").json()
    assert info["multi_label"] is False and info["threshold"] is None
    body = requests.post(server.url + "/upload", files={"file": ("a.png", image_bytes(synthetic_image((1, 2, 3))))})
    assert "labels" not in body.json()


def test_a_grayscale_model_sees_photos_as_fastai_opens_them(exports, tmp_path):
    export = exports["grayscale"]
    paths = probes(tmp_path / "probes", [(48, 40), (64, 50), (30, 30), (100, 70)])
    expected = learner_answers(export, paths)
    app = AppProcess({"MODEL_PATH": str(export)}, tmp_path / "server.log").wait_ready()
    try:
        info = requests.get(app.url + "/model").json()
        assert info["preprocessing"] == "pillow-numpy" and info["backend"] == "onnx"
        for path, (_, probs) in zip(paths, expected, strict=True):
            assert np.abs(in_vocab_order(served(app, path), info["classes"]) - probs).max() <= PARITY
    finally:
        app.stop()


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def test_a_learner_without_an_activation_answers_the_softmax_of_its_raw_scores(exports, tmp_path):
    export = exports["raw_scores"]
    paths = probes(tmp_path / "probes", [(48, 40)] * 4)
    expected = learner_answers(export, paths)
    # learn.predict's own answer: raw scores, not probabilities (they do not sum to 1).
    assert any(abs(float(probs.sum()) - 1) > 0.01 for _, probs in expected)
    app = AppProcess({"MODEL_PATH": str(export)}, tmp_path / "server.log").wait_ready()
    try:
        info = requests.get(app.url + "/model").json()
        assert info["raw_scores"] is True and info["activation"] == "softmax" and info["backend"] == "onnx"
        for path, (_, scores) in zip(paths, expected, strict=True):
            probs = in_vocab_order(served(app, path), info["classes"])
            assert np.abs(probs - softmax(scores)).max() <= PARITY
            assert abs(float(probs.sum()) - 1) < 1e-5
    finally:
        app.stop()
    other = AppProcess({"MODEL_PATH": str(exports["grayscale"])}, tmp_path / "other.log").wait_ready()
    try:
        assert requests.get(other.url + "/model").json()["raw_scores"] is False
    finally:
        other.stop()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_model_without_resize_takes_each_photo_at_its_size_under_concurrency(exports, tmp_path, backend):
    export = exports["without_resize"]
    sizes = [(48 + 9 * i, 40 + 5 * (i % 4)) for i in range(12)]
    paths = probes(tmp_path / "probes", sizes)
    expected = learner_answers(export, paths)
    app = AppProcess({"MODEL_PATH": str(export), "INFERENCE_BACKEND": backend, "MAX_BATCH": "8"},
                     tmp_path / "server.log").wait_ready()
    try:
        vocab = requests.get(app.url + "/model").json()["classes"]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            bodies = list(pool.map(lambda p: served(app, p), paths))
        for body, (_, probs) in zip(bodies, expected, strict=True):
            assert np.abs(in_vocab_order(body, vocab) - probs).max() <= PARITY
        assert "Traceback" not in app.log()
    finally:
        app.stop()


@pytest.mark.parametrize("kind", ["grayscale", "without_resize", "multi_label", "raw_scores"])
def test_their_bundles_serve_the_same_answers_without_torch(exports, tmp_path, kind):
    from app.core.bundle import load_bundle
    from app.core.prediction import infer_batch, prepare_image

    export = exports[kind]
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "app.compile", str(export), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    paths = probes(tmp_path / "probes", [(48, 40), (70, 52)])
    expected = learner_answers(export, paths)
    bundle = load_bundle(out, threads=1)
    assert bundle.manifest.raw_scores is (kind == "raw_scores")
    if kind == "raw_scores":
        assert bundle.manifest.parity["reference"] == "softmax of learn.predict's raw scores"
        expected = [(labels, softmax(scores)) for labels, scores in expected]
    for path, (labels, probs) in zip(paths, expected, strict=True):
        (outcome,) = infer_batch(bundle.predictor, None, prepare_image(path.read_bytes(), bundle.predictor)[None])
        assert np.abs(outcome.probs - probs).max() <= PARITY
        answer = outcome.to_json(bundle.manifest.classes, bundle.predictor.threshold)
        if kind == "multi_label":
            assert answer["labels"] == labels


# A notebook that imports its model's class from a module of its own beside it. (fastai 2.8 pickles
# what the notebook itself defines by value, with cloudpickle, but an imported module's by reference.)
NOTEBOOK = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    sys.path.append(sys.argv[2])  # tests/, for the photos
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, Learner, RandomSplitter, Resize
    from fastai.vision.all import get_image_files, parent_label
    from kinds import fitted, photos
    from notebook_code import TinyNet

    folder = Path(sys.argv[1])
    photos(folder)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(32))
    learn = fitted(Learner(block.dataloaders(folder, bs=6, num_workers=0), TinyNet()))
    learn.export(folder / "export.pkl")
    with learn.no_bar():
        print(json.dumps([float(p) for p in learn.predict(folder / "reds" / "0.png")[2]]))
''')
CODE = textwrap.dedent('''
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.conv(x).relu().mean((2, 3)))
''')


def test_the_notebooks_own_module_comes_from_model_code(tmp_path):
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "notebook.py").write_text(NOTEBOOK)
    code = notebook / "notebook_code.py"
    code.write_text(CODE)
    done = subprocess.run([sys.executable, str(notebook / "notebook.py"), str(tmp_path / "data"), str(ROOT / "tests")],
                          cwd=notebook, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout.strip().splitlines()[-1])
    export = tmp_path / "data" / "export.pkl"

    refused = check(export)
    assert refused.returncode == 3
    (line,) = refused.stderr.strip().splitlines()
    assert "needs the module 'notebook_code'" in line and "MODEL_CODE" in line

    app = AppProcess({"MODEL_PATH": str(export), "MODEL_CODE": str(code)}, tmp_path / "server.log").wait_ready()
    try:
        body = served(app, tmp_path / "data" / "reds" / "0.png")
        assert np.abs(in_vocab_order(body, ["blues", "greens", "reds"]) - np.array(expected)).max() <= PARITY
    finally:
        app.stop()


def test_model_code_that_fails_to_run_is_one_line(tiny_export, tmp_path):
    code = tmp_path / "broken.py"
    code.write_text("raise RuntimeError('not today')\n")
    done = check(tiny_export, MODEL_CODE=str(code))
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1] == (f"cannot serve the model: MODEL_CODE {code} failed to run "
                                                    "(RuntimeError: not today)")
