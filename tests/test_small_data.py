"""A student's small dataset at `app.train`'s defaults (the pretrained EfficientNet-Lite0 body and
a linear head): the temperature and the detector's thresholds rest on every photo (the validation
split and the training photos' out-of-fold answers), and every figure too few photos back is said
so, in the training output and in the model card."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from support import make_dataset

from app.building.evidence import ENOUGH_PHOTOS, warnings_for, wilson_interval


def test_calibration_and_detector_thresholds_use_every_photo(small_model):
    card, *_ = small_model
    every = card["train_images"] + card["valid_images"]
    assert card["head"]["kind"] == "linear" and card["head"]["folds"] >= 2
    assert card["calibration"]["fitted_on"] == "validation split and out-of-fold training photos"
    assert card["calibration"]["photos"] == every
    assert card["detector"]["thresholds_from"] == "validation split and out-of-fold training photos"
    assert card["detector"]["valid_images"] == every


def test_figures_on_sources_left_out_come_with_the_random_split_ones(small_model):
    card, printed, _ = small_model
    split = card["source_split"]
    assert split["sources"] == 4 and split["photos"] == card["train_images"] + card["valid_images"]
    assert split["method"].startswith("4 folds of whole sources")
    assert sum(c["photos"] for c in split["per_class"].values()) == split["photos"]
    assert all(c["sources"] == 4 for c in split["per_class"].values())
    wrong = round((1 - split["accuracy"]) * split["photos"])
    assert len(split["errors"]) == wrong and all(e["source"].startswith("owner/source-") for e in split["errors"])
    assert "on sources left out" in printed and "validation accuracy (random split)" in printed


def test_evaluate_gives_the_figures_on_new_sources_apart(small_model, tmp_path):
    from app.evaluate import main

    card, _, model = small_model
    assert card["train_sources"] == [f"owner/source-{i}" for i in range(4)]
    holdout = make_dataset(tmp_path / "holdout", per_class=4)
    rows = [f"{p.relative_to(holdout)},{p.parent.name},{'owner/source-0' if i % 3 == 0 else 'someone/new'}"
            for i, p in enumerate(sorted(holdout.glob("*/*.jpg")))]
    (holdout / "SOURCES.csv").write_text("file,class,repo\n" + "\n".join(rows) + "\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(holdout), "--model", str(model / "export.pkl"), "--json", str(tmp_path / "r.json")]) == 0
    by_source = json.loads((tmp_path / "r.json").read_text())["by_source"]
    assert by_source["known"] is True
    assert by_source["new sources"]["photos"] == 8 and by_source["new sources"]["sources"] == 1
    assert by_source["sources it trained on"]["photos"] == 4
    assert "new sources" in printed.getvalue() and "sources it trained on" in printed.getvalue()


def test_a_photo_without_a_source_means_no_figures_by_source(tmp_path):
    from app.building.source_split import read_sources, sources_of

    (tmp_path / "a").mkdir()
    (tmp_path / "SOURCES.csv").write_text("file,class,repo\na/1.jpg,a,x/y\n")
    sources = read_sources(tmp_path)
    assert sources_of([tmp_path / "a" / "1.jpg"], sources) == ["x/y"]
    assert sources_of([tmp_path / "a" / "1.jpg", tmp_path / "a" / "2.jpg"], sources) is None
    assert read_sources(tmp_path / "a") == {}


def test_each_figure_too_few_photos_back_gets_one_plain_warning(small_model):
    card, printed, _ = small_model
    warnings = card["warnings"]
    assert len(warnings) == 4, warnings
    valid = card["valid_images"]
    low, high = wilson_interval(round(card["valid_accuracy"] * valid), valid)
    assert warnings[0].startswith(f"validation accuracy {card['valid_accuracy']:.1%} rests on {valid} photos: it "
                                  f"could be anywhere from {low:.0%} to {high:.0%}")
    assert "few photos of blues (12), greens (12), reds (12)" in warnings[1]
    assert warnings[2].startswith("probabilities not calibrated (not fitted:")
    assert warnings[3].startswith(f"the unfamiliar-image detector's thresholds were set on "
                                  f"{card['detector']['valid_images']} photos")
    # No photos of no class were given: the warning says how to keep look-alikes out; with them, it doesn't.
    assert warnings[3].endswith("give some with --unfamiliar OTHER --outlier-exposure")
    # Joined with the ImageNet test (this set's default), it lets fewer through than the k-NN test alone.
    assert "it sometimes takes look-alikes" in warnings[3]
    alone = {**card, "detector": {**card["detector"], "imagenet_test": None}}
    assert "it often takes look-alikes" in warnings_for(alone)[3]
    learnt = {**card, "detector": {**card["detector"], "outlier_exposure": {"negatives": 300}}}
    assert "--outlier-exposure" not in warnings_for(learnt)[3]
    for warning in warnings:
        assert f"\nwarning: {warning}\n" in printed


def test_enough_photos_give_no_warning(small_model):
    card, *_ = small_model
    enough = {**card, "valid_images": ENOUGH_PHOTOS, "images_per_class": {"a": 400, "b": 400},
              "calibration": {**card["calibration"], "applied": True, "note": ""},
              "detector": {**card["detector"], "valid_images": 3 * ENOUGH_PHOTOS}}
    assert warnings_for(enough) == []


@pytest.mark.parametrize(("successes", "n", "low", "high"), [(19, 20, 0.7639, 0.9911), (0, 20, 0.0, 0.1611),
                                                             (20, 20, 0.8389, 1.0), (50, 100, 0.4038, 0.5962)])
def test_the_wilson_interval(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)
