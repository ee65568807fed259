"""Logits and features from one forward pass of a fastai vision model (torch).

fastai's `vision_learner` builds `Sequential(body, head)` whose head starts by pooling the body's
output and flattening it. Those pooled features are what the unfamiliar-image detector compares
(`app.detector`), so the model is split just after that `Flatten`: the same modules, the same
weights, one pass, two outputs. The ONNX export and the torch fallback both run this wrapper, and
training uses it to compute the detector's reference features.
"""

from __future__ import annotations

import torch
from fastai.layers import Flatten
from torch import nn


class LogitsAndFeatures(nn.Module):
    def __init__(self, to_features: nn.Module, to_logits: nn.Module):
        super().__init__()
        self.to_features = to_features
        self.to_logits = to_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.to_features(x)
        return self.to_logits(features), features


def with_features(model: nn.Module) -> LogitsAndFeatures | None:
    """The model as (logits, pooled features), or None if it is not shaped like fastai's
    `vision_learner` models (any other export is then served without a detector)."""
    if not isinstance(model, nn.Sequential) or len(model) != 2 or not isinstance(model[1], nn.Sequential):
        return None
    body, head = model[0], model[1]
    flatten = next((i for i, layer in enumerate(head) if isinstance(layer, (nn.Flatten, Flatten))), None)
    if flatten is None or flatten == len(head) - 1:
        return None
    return LogitsAndFeatures(nn.Sequential(body, *head[: flatten + 1]), nn.Sequential(*head[flatten + 1:])).eval()


def penultimate(wrapper: LogitsAndFeatures, features: torch.Tensor) -> torch.Tensor:
    """The head's last hidden activation (the input of its final Linear), for comparing detectors."""
    return wrapper.to_logits[:-1](features)
