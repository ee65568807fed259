"""Make the tiny fastai 2.7 exports committed beside this script, as a notebook of that era would.

Run with an interpreter that has fastai 2.7.19, for example the environment
`python -m app.compile --fastai 2.7.19` creates (it prints its folder):

    ~/.cache/cuddle-or-not/fastai-2.7.19/bin/python tests/old_exports/make_exports.py

The model is a few small fastai/torch layers (a few KB, so it can be committed), trained for a few
epochs on synthetic colour images; what matters is the pickle, which names fastai 2.7's classes.
Two exports: `-tiny` (labels from folder names) and `-is-cat`, lesson 1's, whose label function
`is_cat` is defined in the notebook, so that the pickle names `__main__.is_cat`. Also writes
`expected.json`: `learn.predict` under that fastai on the images `tests/test_old_exports.py`
generates, so the test can check parity without running fastai 2.7 itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
COLOURS = {"blues": (40, 60, 200), "greens": (40, 180, 60), "reds": (200, 40, 40)}


def image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 25, size=(size[1], size[0], 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def probe_images() -> list[Image.Image]:
    """The images whose predictions the test compares (the test makes the same ones)."""
    return [image(colour, seed=1000 + i, size=(60 + 7 * i, 45)) for i, colour in enumerate(COLOURS.values())]


def is_cat(x):
    """Lesson 1's label function, defined in the notebook: fastai 2.7 pickles it as `__main__.is_cat`."""
    return x[0].isupper()


def train(learner_for, tmp: Path, name: str) -> dict:
    """Train a tiny model with `learner_for(tmp)`, export it as `name`, and return its vocab and
    learn.predict's probabilities on the probe images."""
    from fastai.vision.all import set_seed

    set_seed(0)
    learn = learner_for(tmp)
    with learn.no_bar(), learn.no_logging():
        learn.fit(4, 1e-2)
    out = HERE / name
    learn.export(out)
    probs = []
    for i, img in enumerate(probe_images()):
        path = tmp / f"{'Probe' if i % 2 else 'probe'}-{i}.png"
        img.save(path)
        with learn.no_bar():
            probs.append([float(p) for p in learn.predict(path)[2]])
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return {"file": name, "vocab": [str(v) for v in learn.dls.vocab], "probs": probs}


def main() -> int:
    import fastai
    from fastai.vision.all import (
        CategoryBlock,
        ConvLayer,
        DataBlock,
        Flatten,
        ImageBlock,
        ImageDataLoaders,
        Learner,
        Normalize,
        RandomSplitter,
        Resize,
        get_image_files,
        imagenet_stats,
        parent_label,
    )
    from torch import nn

    if not fastai.__version__.startswith("2.7."):
        print(f"run this with fastai 2.7 (found {fastai.__version__})", file=sys.stderr)
        return 2

    def small_cnn(outputs: int) -> nn.Module:
        return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1),
                             Flatten(), nn.Linear(16, outputs))

    def by_folder(tmp: Path) -> Learner:
        for name, colour in COLOURS.items():
            (tmp / name).mkdir()
            for i in range(12):
                image(colour, seed=i).save(tmp / name / f"{i}.jpg")
        block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                          splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(32),
                          batch_tfms=Normalize.from_stats(*imagenet_stats))
        return Learner(block.dataloaders(tmp, bs=8, num_workers=0), small_cnn(3))

    def lesson_one(tmp: Path) -> Learner:
        # Cats' file names start with a capital letter, as in the Oxford pets data set.
        for i in range(16):
            image(COLOURS["reds"], seed=i).save(tmp / f"Cat_{i}.jpg")
            image(COLOURS["blues"], seed=i).save(tmp / f"dog_{i}.jpg")
        dls = ImageDataLoaders.from_name_func(tmp, get_image_files(tmp), valid_pct=0.25, seed=0, bs=8,
                                              label_func=is_cat, item_tfms=Resize(32), num_workers=0)
        return Learner(dls, small_cnn(2))

    expected = {}
    for key, learner_for, name in (("tiny", by_folder, f"fastai-{fastai.__version__}-tiny.pkl"),
                                   ("is_cat", lesson_one, f"fastai-{fastai.__version__}-is-cat.pkl")):
        with tempfile.TemporaryDirectory() as tmp:
            expected[key] = train(learner_for, Path(tmp), name)
    (HERE / "expected.json").write_text(json.dumps({"fastai": fastai.__version__, **expected}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
