"""The detector's ImageNet test (`app.train --imagenet-test`, on by default for a small set with no
photos of no class): its maths on small arrays, its file, when `app.train` fits it, and the bundle
and server that answer with it. The small set it is fitted on end to end is conftest's
`small_model`, which `test_small_data` shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from support import AppProcess, make_dataset, synthetic_image

from app.building.imagenet_test import SMALL_SET, calibration, gaussian_thresholds, wanted, with_imagenet_test
from app.core.detector import Detector, out_of_fold_scores
from app.core.imagenet_test import support_of

# --- The maths -----------------------------------------------------------------------------------
# Pooled features of 8 dimensions: 4 max-pooled, then 4 average-pooled, which a made-up ImageNet
# classifier of 5 classes reads: class i for average-pooled dimension i (i < 4), class 4 for none.
CLASSIFIER = (np.vstack([8.0 * np.eye(4), np.zeros((1, 4))]).astype(np.float32), np.zeros(5, np.float32))


def photos(rng: np.random.Generator, n: int, imagenet_class: int, max_pooled: float = 20.0) -> np.ndarray:
    """n photos whose average-pooled half points at `imagenet_class`; their max-pooled half, alike
    for all and (at 20) larger, is most of what the k-NN test's cosine similarity sees."""
    average = np.zeros((n, 4), np.float32)
    average[:, imagenet_class] = 1.0
    maximum = max_pooled + rng.normal(0, max_pooled / 20, (n, 4))
    return np.hstack([maximum, average + rng.normal(0, 0.05, (n, 4))]).astype(np.float32)


def knn_test(train: np.ndarray, valid: np.ndarray, valid_predicted: np.ndarray, n_classes: int,
             folds: np.ndarray | None = None, labels: np.ndarray | None = None) -> Detector:
    return Detector.fit("a" * 64, train, valid, valid_predicted, n_classes, train_folds=folds, train_predicted=labels)


def test_photos_imagenet_puts_elsewhere_are_flagged_and_the_training_photos_are_not():
    rng = np.random.default_rng(0)
    train = np.concatenate([photos(rng, 20, 0), photos(rng, 20, 1)])
    labels = np.repeat([0, 1], 20)
    valid = np.concatenate([photos(rng, 5, 0), photos(rng, 5, 1)])
    folds = np.arange(40) % 5
    knn = knn_test(train, valid, np.repeat([0, 1], 5), 2, folds, labels)
    joined = with_imagenet_test(knn, CLASSIFIER, train, valid, np.repeat([0, 1], 5), folds, labels, top=1)
    assert joined.imagenet.joined and joined.imagenet.support.tolist() == [0, 1]
    assert len(joined.imagenet.class_thresholds) == 2
    familiar = np.concatenate([photos(rng, 30, 0), photos(rng, 30, 1)])
    strangers = np.concatenate([photos(rng, 30, 2), photos(rng, 30, 3)])
    assert joined.unfamiliar(familiar, np.repeat([0, 1], 30)).mean() <= 0.1
    assert joined.unfamiliar(strangers, np.repeat([0, 1], 30)).all()
    # The k-NN test sees the strangers' max-pooled half, like the training photos': it lets most through.
    assert knn.unfamiliar(strangers, np.repeat([0, 1], 30)).mean() < 0.5


def test_one_threshold_on_the_joint_score_replaces_the_k_nn_tests_own():
    """The joined test flags a photo on the sum of both standardised scores: some familiar-looking
    photos the k-NN test's own threshold lets through are low enough on both together."""
    rng = np.random.default_rng(3)
    train = np.concatenate([photos(rng, 30, 0), photos(rng, 30, 1)])
    valid = np.concatenate([photos(rng, 10, 0), photos(rng, 10, 1)])
    predicted = np.repeat([0, 1], 10)
    knn = knn_test(train, valid, predicted, 2)
    joined = with_imagenet_test(knn, CLASSIFIER, train, valid, predicted, top=1)
    scale, threshold = joined.imagenet.scale, joined.imagenet.class_thresholds[0]
    assert joined.imagenet.class_thresholds == (threshold, threshold)  # fewer than 40 photos a class: one for all
    probe = photos(rng, 400, 0)
    knn_scores, mass = knn.scores(probe), joined.imagenet.mass(probe)
    joint = scale.joint(knn_scores, mass)
    assert np.array_equal(joined.imagenet.scores(probe, knn_scores), joint)
    flags = joined.unfamiliar(probe, np.zeros(400, int))
    assert np.array_equal(flags, joint < np.float32(threshold))
    assert 0 < flags.mean() <= 0.05
    assert (flags & ~knn.unfamiliar(probe, np.zeros(400, int))).any()


def test_the_reported_flag_rates_are_the_joined_tests():
    rng = np.random.default_rng(4)
    train = np.concatenate([photos(rng, 20, 0), photos(rng, 20, 1)])
    valid = np.concatenate([photos(rng, 45, 0), photos(rng, 45, 1)])
    predicted = np.repeat([0, 1], 45)
    joined = with_imagenet_test(knn_test(train, valid, predicted, 2), CLASSIFIER, train, valid, predicted, top=1)
    flags = joined.unfamiliar(valid, predicted)
    assert joined.valid_false_flag_rate == pytest.approx(flags.mean())
    assert joined.class_false_flag_rates == pytest.approx((flags[:45].mean(), flags[45:].mean()))
    # 45 photos a class (at least 40): each class its own threshold.
    assert joined.imagenet.class_thresholds[0] != joined.imagenet.class_thresholds[1]


def test_gaussian_thresholds_reach_below_the_lowest_score():
    scores = np.concatenate([np.linspace(-1, 1, 50), np.linspace(9, 11, 10)]).astype(np.float32)
    predicted = np.repeat([0, 1], [50, 10])
    first, second = gaussian_thresholds(scores, predicted, 2, 2.0)
    assert first == pytest.approx(scores[:50].mean() - 2 * scores[:50].std()) and first < scores[:50].min()
    assert second == pytest.approx(scores.mean() - 2 * scores.std())  # 10 photos: the overall one


def test_each_training_photo_is_scored_against_the_other_folds_support():
    """One training photo is the only one whose ImageNet class is 3: the support holds class 3, but
    its out-of-fold mass (against the other folds' support, which lacks it) is low: as a new photo
    of its kind would be scored."""
    rng = np.random.default_rng(1)
    train = np.concatenate([photos(rng, 19, 0), photos(rng, 1, 3)])
    folds, labels = np.arange(20) % 5, np.zeros(20, int)
    knn = knn_test(train, train[:0], labels[:0], 1, folds, labels)
    cal = calibration(knn, CLASSIFIER, train, train[:0], labels[:0], folds, labels, top=1)
    assert cal.support.tolist() == [0, 3]
    assert cal.mass[19] < 0.01 and cal.mass[:19].min() > 0.9
    assert np.array_equal(cal.knn, out_of_fold_scores(train, folds, knn.k))
    # Without the out-of-fold scores, thresholds rest on the validation photos alone.
    only_valid = calibration(knn, CLASSIFIER, train, photos(rng, 10, 0), np.zeros(10, int), top=1)
    assert len(only_valid.mass) == len(only_valid.knn) == 10


def test_the_support_is_each_photos_top_classes():
    probs = np.array([[0.5, 0.3, 0.1, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    assert support_of(probs, 1).tolist() == [0, 4]
    assert support_of(probs, 2).tolist() == [0, 1, 3, 4]


def resaved(path, format: int, **imagenet) -> None:
    """The detector file at `path` as an older format wrote it."""
    archive = dict(np.load(path))
    meta = {**json.loads(str(archive.pop("meta"))), "format": format}
    if imagenet:
        meta["imagenet"] = {key: value for key, value in {**meta["imagenet"], **imagenet}.items() if value is not None}
    np.savez(path, meta=np.array(json.dumps(meta)), **archive)


def test_the_test_is_saved_as_it_was_fitted_and_older_files_still_load(tmp_path):
    rng = np.random.default_rng(2)
    # The max-pooled half small: float16 references move the k-NN test's cosines by ~1e-4, more than
    # the spread of the photos above.
    train, valid = np.concatenate([photos(rng, 20, 0, 1.0), photos(rng, 20, 1, 1.0)]), photos(rng, 6, 0, 1.0)
    labels = np.repeat([0, 1], 20)
    # A weight float16 cannot hold exactly: the test is fitted with it rounded, as the file keeps it.
    classifier = (CLASSIFIER[0] + np.float32(1e-4), CLASSIFIER[1])
    plain = knn_test(train, valid, np.zeros(6, int), 2)
    detector = with_imagenet_test(plain, classifier, train, valid, np.zeros(6, int), np.arange(40) % 5, labels)
    assert np.array_equal(detector.imagenet.weight, classifier[0].astype(np.float16).astype(np.float32))
    detector.save(tmp_path / "d.npz")
    again = Detector.load(tmp_path / "d.npz", "a" * 64)
    probe = np.concatenate([photos(rng, 10, c, 1.0) for c in range(4)])
    predicted = rng.integers(0, 2, len(probe))
    knn_scores = detector.scores(probe)
    assert np.array_equal(again.imagenet.scores(probe, knn_scores), detector.imagenet.scores(probe, knn_scores))
    assert np.array_equal(again.unfamiliar(probe, predicted), detector.unfamiliar(probe, predicted))
    assert again.describe() == detector.describe()
    assert again.describe()["imagenet_test"]["support_classes"] == len(detector.imagenet.support)
    assert again.describe()["imagenet_test"]["joined_with_knn"] is True

    # Format 5: the ImageNet test on its own, its thresholds on the mass, OR'd with the k-NN test's.
    mass_thresholds = (0.5, 0.5)
    resaved(tmp_path / "d.npz", 5, scale=None, class_thresholds=mass_thresholds)
    five = Detector.load(tmp_path / "d.npz", "a" * 64)
    assert not five.imagenet.joined and five.describe()["imagenet_test"]["joined_with_knn"] is False
    alone = (plain.unfamiliar(probe, predicted)
             | (five.imagenet.mass(probe) < np.asarray(mass_thresholds, np.float32)[predicted]))
    assert np.array_equal(five.unfamiliar(probe, predicted), alone)
    assert alone.any() and not alone.all()

    # A detector file of format 4 (before the ImageNet test) loads without it.
    plain.save(tmp_path / "old.npz")
    resaved(tmp_path / "old.npz", 4)
    old = Detector.load(tmp_path / "old.npz", "a" * 64)
    assert old.imagenet is None and old.describe()["imagenet_test"] is None
    assert np.array_equal(old.unfamiliar(probe, predicted), plain.unfamiliar(probe, predicted))


# --- When app.train fits it ----------------------------------------------------------------------
SMALL, LARGE = {"a": 30, "b": SMALL_SET + 50}, {"a": SMALL_SET, "b": SMALL_SET}


@pytest.mark.parametrize(("choice", "arch", "head", "outlier_exposure", "counts", "fitted"), [
    ("auto", "efficientnet_lite0", "linear", False, SMALL, True),
    ("auto", "efficientnet_lite2", "linear", False, SMALL, True),
    ("auto", "efficientnet_lite0", "linear", False, LARGE, False),  # the k-NN test has enough photos
    ("auto", "efficientnet_lite0", "linear", True, SMALL, False),  # photos of no class teach the outlier test
    ("auto", "efficientnet_lite0", "trained", False, SMALL, False),  # a trained body: not ImageNet's features
    ("auto", "resnet18", "linear", False, SMALL, False),  # no offline ImageNet classifier
    ("on", "efficientnet_lite0", "linear", True, LARGE, True),
    ("off", "efficientnet_lite0", "linear", False, SMALL, False),
])
def test_app_train_fits_it_on_a_small_set_without_photos_of_no_class(choice, arch, head, outlier_exposure, counts,
                                                                     fitted):
    assert wanted(choice, arch, head, True, outlier_exposure, counts) is fitted


@pytest.mark.parametrize(("options", "why"), [
    (["--arch", "tiny_cnn", "--no-pretrained"], "tiny_cnn has no offline ImageNet classifier"),
    (["--head", "trained"], "it needs the frozen pretrained body of --head linear"),
])
def test_asking_for_it_where_it_cannot_be_fitted_is_refused(tmp_path, capsys, options, why):
    from app.train import main

    data = make_dataset(tmp_path / "data", per_class=6)
    assert main([str(data), "--out", str(tmp_path / "out"), "--imagenet-test", "on", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --imagenet-test on: {why}") and "\n" not in err
    assert not (tmp_path / "out").exists()


# --- app.train end to end (conftest's small_model: 12 synthetic photos a class, at defaults) -----


def test_a_small_set_at_defaults_gets_the_test_and_says_so(small_model):
    from app.core.bundle import load_bundle

    card, printed, model = small_model
    detector = card["detector"]
    assert detector["imagenet_test"]["support_classes"] >= 5 and len(detector["imagenet_test"]["class_thresholds"]) == 3
    assert detector["outlier_exposure"] is None
    assert detector["imagenet_test"]["joined_with_knn"] is True
    assert "k-NN and ImageNet tests' scores together" in detector["threshold_rule"]
    assert "joined with the ImageNet test" in printed and "threshold 0." not in printed
    assert "(its ImageNet test with it)" in card["source_split"]["method"]
    # The test travels in the bundle the server loads, exactly as the export's detector holds it.
    bundle = load_bundle(model / "bundle", 1)
    exported = Detector.load(model / "export.detector.npz", card["export_sha256"])
    assert bundle.detector.describe()["imagenet_test"] == detector["imagenet_test"]
    assert np.array_equal(bundle.detector.imagenet.weight, exported.imagenet.weight)
    assert np.array_equal(bundle.detector.imagenet.support, exported.imagenet.support)


def test_the_server_answers_with_the_imagenet_test(small_model, tmp_path):
    """A real server on the bundle: `/model` describes the test, and each upload's `unfamiliar` is
    what the detector with it says of that photo."""
    from app.core.bundle import load_bundle
    from app.core.prediction import prepare_image

    card, _, model = small_model
    app = AppProcess({"MODEL_PATH": str(model / "bundle")}, tmp_path / "server.log").wait_ready()
    bundle = load_bundle(model / "bundle", 1)
    (tmp_path / "greys").mkdir()
    for i in range(3):
        synthetic_image((128, 128, 128), seed=100 + i).save(tmp_path / "greys" / f"{i}.jpg")
    uploads = [*sorted((model.parent / "data").glob("*/*.jpg"))[::6], *sorted((tmp_path / "greys").glob("*.jpg"))]
    try:
        assert requests.get(app.url + "/model").json()["detector"]["imagenet_test"] == card["detector"]["imagenet_test"]
        for path in uploads:
            body = requests.post(app.url + "/upload", files={"file": (path.name, path.read_bytes())}).json()
            probs, features = bundle.predictor.infer(prepare_image(path.read_bytes(), bundle.predictor)[None])
            assert body["unfamiliar"] == bool(bundle.detector.unfamiliar(features, probs.argmax(axis=1))[0]), path
    finally:
        app.stop()


def test_photos_of_no_class_or_a_tiny_cnn_mean_no_imagenet_test(tiny_export):
    card = json.loads((tiny_export.parent / "model-card.json").read_text())
    assert card["detector"]["imagenet_test"] is None


def test_the_int8_bundle_refits_the_imagenet_test_on_its_own_features(small_model, tmp_path):
    """INT8 features differ a little from FP32's: the INT8 bundle's ImageNet test keeps the
    classifier and is fitted again on them, as its k-NN test is."""
    from app.building.int8 import quantize_bundle, training_split
    from app.core.bundle import load_bundle

    card, _, model = small_model
    data = model.parent / "data"
    train_files, valid_files, how = training_split(data, card, card["classes"])
    quantize_bundle(model / "bundle", tmp_path / "int8", train_files, valid_files, 1, {"data": str(data), "split": how},
                    force=True)
    fp32, int8 = load_bundle(model / "bundle", 1).detector, load_bundle(tmp_path / "int8", 1).detector
    assert int8.imagenet is not None
    assert np.array_equal(int8.imagenet.weight, fp32.imagenet.weight)
    assert np.array_equal(int8.imagenet.bias, fp32.imagenet.bias)
    assert int8.imagenet.class_thresholds != fp32.imagenet.class_thresholds  # refitted, not copied
