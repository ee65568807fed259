"""The unfamiliar-image detector and temperature scaling: their maths on small arrays, a tiny model
trained end to end, the API's `unfamiliar`, parity of the fast path, and the default model on real
photos of bears and of no bear."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import BEARS, CLASS_COLOURS, NO_BEARS, ROOT, image_bytes, synthetic_image

from app.building.calibration import calibrate, expected_calibration_error, fit_temperature, fold_temperature, nll
from app.core.detector import Detector, DetectorError, detector_path, knn_similarity, l2_normalised, threshold_keeping
from app.core.files import sha256_file
from app.core.model_file import ModelLoadError

NOT_BEARS = ROOT.parent / "shared" / "data" / "not-bears"

# --- The maths -----------------------------------------------------------------------------------


def test_each_predicted_class_gets_its_own_share_of_false_flags():
    """A class whose photos are far more varied (teddy bears in every setting) no longer takes most
    of the false flags: each class's threshold keeps 97% of its own validation photos."""
    rng = np.random.default_rng(1)
    spread = np.array([1.0, 1.0, 3.0])[:, None, None]  # class 2 is three times as varied

    def varied(n: int) -> np.ndarray:
        return np.concatenate(np.eye(16)[:3, None] * 10 + spread * rng.normal(0, 1, (3, n, 16)))

    detector = Detector.fit("a" * 64, varied(200), varied(100), labels(100), 3, k=5, keep=0.97)
    assert detector.class_false_flag_rates == pytest.approx((0.03, 0.03, 0.03), abs=0.011)
    new = varied(1000)
    per_class = [detector.unfamiliar(new, labels(1000))[labels(1000) == c].mean() for c in range(3)]
    one_threshold = detector.scores(new) < detector.threshold
    one_rule = [one_threshold[labels(1000) == c].mean() for c in range(3)]
    # One threshold: the varied class takes every false flag; one per class: each takes its share.
    assert one_rule[0] == one_rule[1] == 0 and one_rule[2] > 0.07
    assert all(0.01 < rate < 0.08 for rate in per_class), per_class
    assert detector.describe()["rule"] == "per predicted class"


def test_a_detector_of_the_first_format_still_loads_with_one_threshold(tmp_path):
    rng = np.random.default_rng(0)
    old = Detector("a" * 64, l2_normalised(clusters(rng, 10)), 5, 0.5, 0.03, 30)
    old.save(tmp_path / "old.npz")
    archive = dict(np.load(tmp_path / "old.npz"))
    meta = {k: v for k, v in json.loads(str(archive["meta"])).items() if not k.startswith("class_")}
    np.savez(tmp_path / "old.npz", reference=archive["reference"], meta=np.array(json.dumps({**meta, "format": 1})))
    loaded = Detector.load(tmp_path / "old.npz", "a" * 64)
    assert loaded.class_thresholds == () and loaded.describe()["rule"] == "one for every class"
    assert loaded.unfamiliar(np.eye(16)[7:9] * 10, np.array([0, 2])).all()


def test_knn_similarity_is_sklearns_cosine_neighbour():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    for k in (1, 5, 50):
        ours = knn_similarity(l2_normalised(reference), l2_normalised(queries), k)
        distances, _ = NearestNeighbors(n_neighbors=k, metric="cosine").fit(reference).kneighbors(queries)
        assert np.allclose(ours, 1 - distances[:, -1], atol=1e-6)


def test_threshold_bounds_the_share_of_new_photos_flagged():
    scores = np.arange(100, dtype=np.float32) / 100
    threshold = threshold_keeping(scores, keep=0.97)
    # The 3rd lowest of 100: a new score ranks below it with probability 3/101 <= 3%.
    assert threshold == scores[2] and np.mean(scores < threshold) == pytest.approx(0.02)
    new = np.random.default_rng(0).random((2000, 100)).astype(np.float32)  # 2000 draws of 100 scores + 1 new
    rates = [float(row[-1] < threshold_keeping(row[:-1], 0.97)) for row in new]
    assert np.mean(rates) <= 0.03 + 0.01
    assert threshold_keeping(scores[:5], keep=0.97) == scores[0]  # a handful: at least the lowest


def clusters(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = np.eye(16)[:3] * 10
    return np.concatenate([c + rng.normal(0, 1, (n, 16)) for c in centres])


def labels(n: int) -> np.ndarray:
    """The class of each row of `clusters(rng, n)`."""
    return np.repeat(np.arange(3), n)


def test_detector_flags_what_lies_far_from_every_training_point(tmp_path):
    rng = np.random.default_rng(0)
    detector = Detector.fit("a" * 64, clusters(rng, 40), clusters(rng, 20), labels(20), 3, k=5, keep=0.97)
    assert detector.valid_false_flag_rate <= 0.05
    assert not detector.unfamiliar(clusters(rng, 10), labels(10)).mean() > 0.1
    foreign = np.eye(16)[5:8] * 10 + rng.normal(0, 1, (3, 16))  # other directions entirely
    assert detector.unfamiliar(foreign, np.arange(3)).all()

    path = tmp_path / "export.detector.npz"
    detector.save(path)
    again = Detector.load(path, "a" * 64)
    assert again.describe() == detector.describe()
    probe = clusters(rng, 5)
    assert np.abs(again.scores(probe) - detector.scores(probe)).max() < 2e-3  # stored as float16
    with pytest.raises(DetectorError, match="made for another export"):
        Detector.load(path, "b" * 64)
    path.write_bytes(b"not an archive")
    with pytest.raises(DetectorError, match="not a readable detector"):
        Detector.load(path, "a" * 64)


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(3, p=p) for p in probs])  # labels drawn from calibrated probabilities
    overconfident = logits * 3
    assert fit_temperature(overconfident, targets) == pytest.approx(3, rel=0.1)
    result = calibrate(overconfident, targets)
    assert result.applied and result.nll_after < result.nll_before and result.ece_after < result.ece_before
    assert expected_calibration_error(probs, targets) < 0.03
    assert nll(overconfident, targets, result.temperature) == pytest.approx(result.nll_after)


def test_a_temperature_is_folded_into_the_last_linear_layer():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    before = model(x).detach()
    fold_temperature(model, 2.5)
    assert torch.allclose(model(x).detach(), before / 2.5, atol=1e-6)


# --- A tiny model, end to end --------------------------------------------------------------------


def checkerboard(size: int = 48) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    board = (((xx // 4) + (yy // 4)) % 2 * 255).astype(np.uint8)
    from PIL import Image

    return image_bytes(Image.fromarray(np.stack([board, 255 - board, board], -1)), "PNG")


@pytest.fixture(scope="module")
def tiny_model(tiny_export: Path):
    from app.building.evaluate import load_model

    return load_model(tiny_export, threads=1)


def test_training_saves_a_detector_bound_to_the_export(tiny_export):
    detector = Detector.load(detector_path(tiny_export), sha256_file(tiny_export))
    card = json.loads((tiny_export.parent / "model-card.json").read_text())
    assert card["detector"]["threshold"] == pytest.approx(detector.threshold, abs=1e-6)
    assert card["detector"]["unfamiliar_photos"] is None  # no --unfamiliar folder given
    assert card["calibration"]["temperature"] > 0
    assert detector.reference.shape[0] == card["train_images"]


def test_tiny_detector_flags_a_foreign_image_and_not_its_training_images(tiny_model, tmp_path):
    from support import make_dataset

    from app.building.datasets import image_files
    from app.building.measure import predict_files

    predictor, detector, _ = tiny_model
    data = make_dataset(tmp_path / "data")  # the very images the tiny model was trained on
    own = predict_files(predictor, detector, [f for cls in CLASS_COLOURS for f in image_files(data / cls)])
    (tmp_path / "board.png").write_bytes(checkerboard())
    foreign = predict_files(predictor, detector, [tmp_path / "board.png"])
    assert foreign.unfamiliar.tolist() == [True]
    # A one-epoch CNN's features are crude, and a threshold set on 6 validation images is rough, so
    # a few of its own photos may fall just under it; the foreign image is far below all of them.
    assert own.unfamiliar.mean() <= 0.2
    assert detector.scores(foreign.features)[0] < detector.scores(own.features).min() - 0.01


def test_fast_path_and_torch_path_agree_detector_included(tiny_learner, model_copy):
    from app.core.prediction import infer_batch
    from app.learner.compile import build_predictor

    sha = sha256_file(model_copy)
    detector = Detector.load(detector_path(model_copy), sha)
    fast = build_predictor(tiny_learner, threads=1, with_features=True)
    slow = build_predictor(tiny_learner, threads=1, backend="torch", with_features=True)
    assert (fast.backend, slow.backend) == ("onnx", "torch")
    images = [synthetic_image(c, size=(60, 50), seed=i) for i, c in enumerate(CLASS_COLOURS.values())]
    batch = np.stack([fast.prepare(img) for img in images])
    (p1, f1), (p2, f2) = fast.infer(batch), slow.infer(batch)
    assert np.abs(p1 - p2).max() < 1e-5 and np.abs(f1 - f2).max() < 1e-4
    ours = [o.unfamiliar for o in infer_batch(fast, detector, batch)]
    theirs = [o.unfamiliar for o in infer_batch(slow, detector, batch)]
    assert ours == theirs


def test_the_api_says_unfamiliar_and_model_describes_the_detector(server):
    info = requests.get(server.url + "/model", timeout=5).json()
    assert info["detector"]["method"] == "knn-cosine" and 0 <= info["detector"]["valid_false_flag_rate"] <= 1
    own = requests.post(server.url + "/upload", timeout=30,
                        files={"file": ("r.jpg", image_bytes(synthetic_image(CLASS_COLOURS["reds"])))}).json()
    board = requests.post(server.url + "/upload", timeout=30, files={"file": ("b.png", checkerboard())}).json()
    assert own["unfamiliar"] is False and board["unfamiliar"] is True
    assert [label for label, _ in board["predictions"]] != []  # the guesses are still all there
    assert len(board["predictions"]) == 3


def test_a_model_without_a_detector_is_served_as_before(model_copy):
    from app.serving.config import Settings
    from app.serving.metrics import Metrics
    from app.serving.startup import start_serving

    detector_path(model_copy).unlink()

    async def classify() -> tuple[dict, object]:
        serving = await start_serving(Settings(model_path=model_copy, threads=1), Metrics())
        try:
            data = image_bytes(synthetic_image(CLASS_COLOURS["blues"]))

            async def read() -> bytes:
                return data

            return await serving.classifier.classify(read), serving.classifier.model.detector
        finally:
            await serving.stop()

    result, detector = asyncio.run(classify())
    assert detector is None and set(result) == {"predictions"}


def test_a_detector_made_for_another_export_stops_start_up(model_copy, tiny_export, tmp_path):
    from app.serving.config import Settings
    from app.serving.metrics import Metrics
    from app.serving.startup import start_serving

    other = tmp_path / "other.npz"
    Detector.load(detector_path(tiny_export), sha256_file(tiny_export))
    shutil.copy(detector_path(model_copy), other)
    model_copy.with_name("model-card.json").unlink(missing_ok=True)  # the detector is what is checked here
    with open(model_copy, "ab") as f:
        f.write(b"\0")  # another export now, still loadable
    with pytest.raises(ModelLoadError, match="detector.npz was made for another export"):
        asyncio.run(start_serving(Settings(model_path=model_copy, threads=1), Metrics()))


# --- The default model on real photos -------------------------------------------------------------


@pytest.mark.skipif(not (BEARS.is_dir() and NOT_BEARS.is_dir()), reason=NO_BEARS)
def test_default_model_says_unfamiliar_for_photos_of_no_bear_and_not_for_bears(tmp_path_factory):
    """Through the real server: vehicles and food (nearly always flagged) and the default model's own
    validation photos (3% by construction of the threshold)."""
    from support import AppProcess

    from app.building.datasets import find_classes, image_files, split

    app = AppProcess({}, tmp_path_factory.mktemp("default") / "server.log").wait_ready()
    try:
        def unfamiliar(path: Path) -> bool:
            response = requests.post(app.url + "/upload", files={"file": (path.name, path.read_bytes())}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()["unfamiliar"]

        others = [p for folder in ("vehicles", "food") for p in image_files(NOT_BEARS / folder)]
        flagged = np.mean([unfamiliar(p) for p in others])
        files = [f for cls in find_classes(BEARS) for f in image_files(BEARS / cls)]
        _, valid = split(files, 0.2, 42)
        false_flags = np.mean([unfamiliar(p) for p in valid[::3]])
    finally:
        app.stop()
    assert flagged >= 0.9, flagged
    assert false_flags <= 0.06, false_flags


def test_the_server_keeps_numpys_openblas_to_one_thread():
    """Handing the detector's small matrix product to a second OpenBLAS thread between ONNX
    Runtime's batches cost a quarter of the throughput (README, Performance)."""
    script = ("import json, numpy; from threadpoolctl import threadpool_info; "
              "from app.core.detector import single_threaded_blas; single_threaded_blas(); "
              "print(json.dumps([i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas']))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert json.loads(out.stdout) == [1]
