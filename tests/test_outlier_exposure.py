"""The detector's second test, learnt from photos of no class (`app.train --unfamiliar OTHER
--outlier-exposure`): its maths on small arrays, its file, and `app.train` end to end with the
bundle the server loads."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import requests
from support import AppProcess, make_dataset, synthetic_image

from app.building.linear_head import stratified_folds
from app.building.outlier_exposure import KEEP as OUTLIER_KEEP
from app.building.outlier_exposure import fit_outlier_test
from app.core.detector import Detector

# --- The maths -----------------------------------------------------------------------------------


def two_classes(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """n photos of each of two classes in 32 dimensions, moved `shift` along the direction the
    photos of no class lie in (dimension 2)."""
    centres = np.zeros((2, 32))
    centres[0, 0] = centres[1, 1] = 4.0
    centres[:, 2] = -shift
    return np.concatenate([c + rng.normal(0, 1, (n, 32)) for c in centres])


def labels_of(n: int) -> np.ndarray:
    return np.repeat([0, 1], n)


def no_class(rng: np.random.Generator, n: int) -> np.ndarray:
    """Photos of other things: some with the classes' look but far along dimension 2, some not."""
    return np.concatenate([two_classes(rng, n // 2, shift=8.0), rng.normal(0, 1, (n, 32)) - 8.0 * np.eye(32)[2]])


def test_the_outlier_test_flags_look_alikes_the_knn_test_lets_through():
    """The k-NN test compares directions (cosine), and a photo with the classes' look that lies
    towards other things points almost where they do; photos of other things show the second
    test which way those lie."""
    rng = np.random.default_rng(0)
    train, valid = two_classes(rng, 20), two_classes(rng, 5)
    knn = Detector.fit("a" * 64, train, valid, labels_of(5), 2, k=5, keep=0.97)
    negatives = no_class(rng, 80)
    fitted = fit_outlier_test(train, labels_of(20), labels_of(20), valid, labels_of(5), negatives,
                              np.zeros(len(negatives), int), 2, keep=0.97)
    both = replace(knn, outlier=fitted.test)

    look_alikes, new = two_classes(rng, 100, shift=8.0), two_classes(rng, 100)
    knn_caught = knn.unfamiliar(look_alikes, labels_of(100)).mean()
    caught = both.unfamiliar(look_alikes, labels_of(100)).mean()
    assert knn_caught <= 0.5 and caught >= 0.9, (knn_caught, caught)
    assert fitted.test.unfamiliar(new, labels_of(100)).mean() <= 0.1  # photos like the training ones stay familiar
    assert fitted.test.negatives == len(negatives) and len(fitted.test.class_thresholds) == 2


def test_photos_of_no_class_are_flagged_out_of_fold():
    """The flags reported for the photos the test learnt from come from folds that never saw them:
    photos indistinguishable from the training photos are then flagged about as often as new
    training-like photos, where the model that learnt them would flag them far more."""
    rng = np.random.default_rng(0)
    dims = 200  # more dimensions than photos: a regression can learn any photo by heart
    train = rng.normal(0, 1, (60, dims)) + 3.0
    negatives = rng.normal(0, 1, (60, dims)) + 3.0
    labels = np.repeat([0, 1], 30)
    fitted = fit_outlier_test(train, labels, labels, train[:0], labels[:0], negatives, np.zeros(60, int), 2,
                              keep=0.9)
    in_sample = fitted.test.unfamiliar(negatives, np.zeros(60, int)).mean()
    out_of_fold = fitted.negative_flags.mean()
    assert out_of_fold <= 0.35 and in_sample >= out_of_fold + 0.3, (out_of_fold, in_sample)


def test_the_outlier_test_holds_out_the_folds_it_is_given():
    """app.train gives it the linear head's folds, so that a training photo's out-of-fold class and
    its out-of-fold score come from the same fold; without them it draws the same stratified folds."""
    rng = np.random.default_rng(2)
    train, negatives, labels = two_classes(rng, 20), no_class(rng, 40), labels_of(20)
    args = (train, labels, labels, train[:0], labels[:0], negatives, np.zeros(len(negatives), int), 2)
    drawn = fit_outlier_test(*args, keep=0.9)
    same = fit_outlier_test(*args, keep=0.9, folds=stratified_folds(labels, 5, 42))
    assert same.test.class_thresholds == drawn.test.class_thresholds
    assert np.array_equal(same.negative_flags, drawn.negative_flags)
    # Two folds of half the photos each: every photo scored by a fit on the other half only.
    halves = fit_outlier_test(*args, keep=0.9, folds=np.tile([0, 1], 20))
    assert halves.test.class_thresholds != drawn.test.class_thresholds
    assert np.array_equal(halves.test.weight, drawn.test.weight)  # the test itself is fitted on every photo


def test_the_outlier_test_is_saved_exactly_and_older_files_still_load(tmp_path):
    rng = np.random.default_rng(1)
    train, valid = two_classes(rng, 20), two_classes(rng, 5)
    negatives = no_class(rng, 20)
    fitted = fit_outlier_test(train, labels_of(20), labels_of(20), valid, labels_of(5), negatives,
                              np.zeros(len(negatives), int), 2, keep=0.97)
    plain = Detector.fit("a" * 64, train, valid, labels_of(5), 2)
    detector = replace(plain, outlier=fitted.test)
    detector.save(tmp_path / "d.npz")
    again = Detector.load(tmp_path / "d.npz", "a" * 64)
    probe = np.concatenate([two_classes(rng, 30, shift=5.0), negatives])
    predicted = rng.integers(0, 2, len(probe))
    assert np.array_equal(again.outlier.scores(probe), detector.outlier.scores(probe))
    assert np.array_equal(again.unfamiliar(probe, predicted), detector.unfamiliar(probe, predicted))
    assert again.describe() == detector.describe()
    assert again.describe()["outlier_exposure"]["negatives"] == len(negatives)

    # A detector file of format 3 (before the outlier test) loads as the k-NN test alone.
    plain.save(tmp_path / "old.npz")
    archive = dict(np.load(tmp_path / "old.npz"))
    meta = json.loads(str(archive["meta"]))
    meta.pop("outlier", None)
    np.savez(tmp_path / "old.npz", reference=archive["reference"], meta=np.array(json.dumps({**meta, "format": 3})))
    old = Detector.load(tmp_path / "old.npz", "a" * 64)
    assert old.outlier is None and old.describe()["outlier_exposure"] is None
    assert np.array_equal(old.unfamiliar(probe, predicted), plain.unfamiliar(probe, predicted))


# --- app.train end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    from app.train import main

    root = tmp_path_factory.mktemp("outlier")
    data = make_dataset(root / "data", per_class=12)
    other = root / "other"
    for name, colour in {"greys": (128, 128, 128), "yellows": (220, 200, 40)}.items():
        (other / name).mkdir(parents=True)
        for i in range(10):
            synthetic_image(colour, seed=100 + i).save(other / name / f"{i}.jpg")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main([str(data), "--out", str(root / "model"), "--quiet", "--unfamiliar", str(other),
                       "--outlier-exposure"])
    assert status == 0, printed.getvalue()
    return root, json.loads((root / "model" / "model-card.json").read_text()), printed.getvalue()


def test_app_train_learns_from_the_photos_of_no_class_and_says_so(trained):
    from app.core.bundle import load_bundle

    root, card, printed = trained
    detector = card["detector"]
    assert detector["outlier_exposure"]["negatives"] == 20
    assert detector["imagenet_test"] is None  # photos of no class stand for other things: no ImageNet test
    assert len(detector["outlier_exposure"]["class_thresholds"]) == 3
    assert "outlier exposure" in detector["threshold_rule"] and "out of fold" in detector["threshold_rule"]
    # Its own share, not the k-NN test's.
    assert f"split-conformal {1 - OUTLIER_KEEP:.0%} quantile of its own scores" in detector["threshold_rule"]
    assert detector["unfamiliar_photos"]["overall"]["images"] == 20
    assert set(detector["unfamiliar_photos"]["per_folder"]) == {"greys", "yellows"}
    assert "and outlier exposure" in printed and "(out of fold)" in printed
    # The test travels in the bundle the server loads, and answers there as in the export's detector.
    bundle = load_bundle(root / "model" / "bundle", 1)
    assert bundle.detector is not None and bundle.detector.outlier is not None
    assert bundle.detector.describe()["outlier_exposure"] == detector["outlier_exposure"]
    exported = Detector.load(root / "model" / "export.detector.npz", card["export_sha256"])
    assert np.array_equal(exported.outlier.weight, bundle.detector.outlier.weight)


def test_the_server_answers_with_both_tests(trained, tmp_path):
    """A real server on the bundle: `/model` describes the outlier test, and each upload's
    `unfamiliar` is what the detector with both tests says of that photo."""
    from app.core.bundle import load_bundle
    from app.core.prediction import prepare_image

    root, card, _ = trained
    app = AppProcess({"MODEL_PATH": str(root / "model" / "bundle")}, tmp_path / "server.log").wait_ready()
    bundle = load_bundle(root / "model" / "bundle", 1)
    try:
        info = requests.get(app.url + "/model").json()
        assert info["detector"]["outlier_exposure"] == card["detector"]["outlier_exposure"]
        photos = [*sorted((root / "data").glob("*/*.jpg"))[::4], *sorted((root / "other").glob("*/*.jpg"))[::3]]
        answers = {}
        for path in photos:
            body = requests.post(app.url + "/upload", files={"file": (path.name, path.read_bytes())}).json()
            probs, features = bundle.predictor.infer(prepare_image(path.read_bytes(), bundle.predictor)[None])
            expected = bundle.detector.unfamiliar(features, probs.argmax(axis=1))[0]
            assert body["unfamiliar"] == bool(expected), path
            answers[path] = body["unfamiliar"]
        # The photos it learnt as "no class" are flagged; most photos of the classes are not.
        assert all(flag for path, flag in answers.items() if "other" in path.parts)
        assert sum(not flag for path, flag in answers.items() if "data" in path.parts) >= 7
    finally:
        app.stop()


def test_outlier_exposure_without_photos_of_no_class_is_refused(tmp_path, capsys):
    from app.train import main

    data = make_dataset(tmp_path / "data", per_class=6)
    assert main([str(data), "--out", str(tmp_path / "out"), "--outlier-exposure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --outlier-exposure learns from photos of no class: give them with --unfamiliar OTHER"
    assert not (tmp_path / "out" / "export.pkl").exists()


@pytest.mark.parametrize("option", ["--outlier-keep", "--detector-keep"])
@pytest.mark.parametrize("share", ["1.5", "0", "1"])
def test_a_share_kept_familiar_outside_0_to_1_is_refused(tmp_path, capsys, option, share):
    from app.train import main

    data = make_dataset(tmp_path / "data", per_class=6)
    assert main([str(data), "--out", str(tmp_path / "out"), option, share]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {option} is the share of photos kept familiar, between 0 and 1; got {float(share)}"
    assert not (tmp_path / "out").exists()
