"""Real fastai exports of every kind the README's table names, made in seconds with the installed
fastai: image classifiers that are served (multi-label, grayscale, without a Resize) and learners
for other tasks that are refused. Small fastai/torch layers stand in for real networks: what the
server reads is the learner's data pipeline and loss, and the model's input and output shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from support import CLASS_COLOURS, synthetic_image


def photos(folder: Path, per_class: int = 6, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Synthetic photos in one sub-folder per class (labelled by fastai's own `parent_label`, so
    that the exports need no code of the tests')."""
    files = []
    for name, colour in CLASS_COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / name / f"{i}.png"
            synthetic_image(colour, size=size, seed=i).save(path)
            files.append(path)
    return files


def small_cnn(channels_in: int, outputs: int):
    from fastai.vision.all import ConvLayer, Flatten
    from torch import nn

    return nn.Sequential(ConvLayer(channels_in, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1),
                         Flatten(), nn.Linear(16, outputs))


def fitted(learn, epochs: int = 3):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-2)
    return learn


def image_learner(folder: Path, blocks, get_y=None, channels_in: int = 3, outputs: int = 3, item_tfms=None,
                  bs: int = 6, **kwargs):
    from fastai.vision.all import DataBlock, Learner, RandomSplitter, get_image_files, parent_label

    photos(folder)
    block = DataBlock(blocks=blocks, get_items=get_image_files, get_y=get_y or parent_label,
                      splitter=RandomSplitter(0.25, seed=0), item_tfms=item_tfms, **kwargs)
    dls = block.dataloaders(folder, bs=bs, num_workers=0)
    return Learner(dls, small_cnn(channels_in, outputs))


def export(learn, dest: Path) -> Path:
    learn.export(dest)
    return dest


def make_multi_label(folder: Path) -> Path:
    """Labels from a table, as in fastbook chapter 6: each photo has its colour and "even" or "odd"."""
    import pandas as pd
    from fastai.vision.all import (
        ColReader,
        DataBlock,
        ImageBlock,
        Learner,
        MultiCategoryBlock,
        RandomSplitter,
        Resize,
    )

    files = photos(folder)
    labels = [f"{p.parent.name} {'even' if int(p.stem) % 2 == 0 else 'odd'}" for p in files]
    df = pd.DataFrame({"fname": [str(p.relative_to(folder)) for p in files], "labels": labels})
    block = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader("fname", pref=f"{folder}/"),
                      get_y=ColReader("labels", label_delim=" "), splitter=RandomSplitter(0.25, seed=0),
                      item_tfms=Resize(32))
    learn = Learner(block.dataloaders(df, bs=6, num_workers=0), small_cnn(3, 5))
    return export(fitted(learn), folder / "multi-label.pkl")


def make_grayscale(folder: Path) -> Path:
    from fastai.vision.all import CategoryBlock, ImageBlock, PILImageBW, Resize

    learn = image_learner(folder, (ImageBlock(cls=PILImageBW), CategoryBlock), channels_in=1, item_tfms=Resize(32))
    return export(fitted(learn), folder / "grayscale.pkl")


def make_without_resize(folder: Path) -> Path:
    """Trained on photos of one size, with no Resize: fastai feeds every photo at its own size."""
    from fastai.vision.all import CategoryBlock, ImageBlock

    learn = image_learner(folder, (ImageBlock, CategoryBlock))
    return export(fitted(learn), folder / "no-resize.pkl")


def make_raw_scores(folder: Path) -> Path:
    """fastbook's `Learner(dls, simple_cnn, loss_func=F.cross_entropy)`: a loss without an
    activation, so learn.predict gives raw scores."""
    import torch.nn.functional as F
    from fastai.vision.all import CategoryBlock, ImageBlock, Resize

    learn = image_learner(folder, (ImageBlock, CategoryBlock), item_tfms=Resize(32))
    learn.loss_func = F.cross_entropy
    return export(fitted(learn), folder / "raw-scores.pkl")


def make_regression(folder: Path) -> Path:
    from fastai.vision.all import ImageBlock, RegressionBlock, Resize

    learn = image_learner(folder, (ImageBlock, RegressionBlock), lambda p: float(len(p.parent.name)), outputs=1,
                          item_tfms=Resize(32))
    return export(learn, folder / "regression.pkl")


def make_segmentation(folder: Path) -> Path:
    from fastai.vision.all import DataBlock, ImageBlock, Learner, MaskBlock, RandomSplitter, Resize
    from torch import nn

    files = photos(folder)
    masks = folder / "masks"
    masks.mkdir()
    for path in files:
        mask = Image.fromarray((np.arange(48 * 40).reshape(40, 48) % 2).astype(np.uint8))
        mask.save(masks / f"{path.parent.name}-{path.name}")
    block = DataBlock(blocks=(ImageBlock, MaskBlock(codes=["a", "b"])), get_items=lambda _: files,
                      get_y=lambda p: masks / f"{p.parent.name}-{p.name}", splitter=RandomSplitter(0.25, seed=0),
                      item_tfms=Resize(32))
    dls = block.dataloaders(folder, bs=4, num_workers=0)
    return export(Learner(dls, nn.Conv2d(3, 2, 1)), folder / "segmentation.pkl")


def make_keypoints(folder: Path) -> Path:
    from fastai.vision.all import ImageBlock, PointBlock, Resize

    learn = image_learner(folder, (ImageBlock, PointBlock), lambda p: np.array([[10.0, 12.0]]), outputs=2,
                          item_tfms=Resize(32))
    return export(learn, folder / "keypoints.pkl")


def make_tabular(folder: Path) -> Path:
    import pandas as pd
    from fastai.tabular.all import Categorify, Normalize, TabularDataLoaders, tabular_learner

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"colour": rng.choice(list(CLASS_COLOURS), 60), "size": rng.normal(0, 1, 60),
                       "label": rng.choice(["yes", "no"], 60)})
    dls = TabularDataLoaders.from_df(df, y_names="label", cat_names=["colour"], cont_names=["size"],
                                     procs=[Categorify, Normalize], bs=8)
    return export(tabular_learner(dls, layers=[8]), folder / "tabular.pkl")


def make_text(folder: Path) -> Path:
    import pandas as pd
    from fastai.text.all import AWD_LSTM, TextDataLoaders, awd_lstm_clas_config, text_classifier_learner

    texts = [f"a {c} teddy bear number {i}" for c in CLASS_COLOURS for i in range(8)]
    df = pd.DataFrame({"text": texts, "label": [t.split()[1] for t in texts]})
    dls = TextDataLoaders.from_df(df, text_col="text", label_col="label", bs=8, num_workers=0)
    config = {**awd_lstm_clas_config, "emb_sz": 8, "n_hid": 8, "n_layers": 1}
    return export(text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=config), folder / "text.pkl")


# Each refused kind and the words its one line names it with.
REFUSED = {
    "tabular": (make_tabular, "a tabular model (fastai.tabular)"),
    "text": (make_text, "a text model (fastai.text)"),
    "segmentation": (make_segmentation, "a segmentation model (it predicts a mask per pixel)"),
    "regression": (make_regression, "a regression model (it predicts numbers, not classes)"),
    "keypoints": (make_keypoints, "a keypoint or object-detection model"),
}
