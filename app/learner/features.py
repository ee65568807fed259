"""Logits and features from one forward pass of a fastai vision model (torch).

fastai's `vision_learner` builds `Sequential(body, head)` whose head starts by pooling the body's
output and flattening it. Those pooled features are what the unfamiliar-image detector compares
(`app.core.detector`), so the model is split just after that `Flatten`: the same modules, the same
weights, one pass, two outputs. The ONNX export and the torch fallback both run this wrapper, and
training uses it to compute the detector's reference features.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _wrapper_class() -> type:
    # Defined on first use, so that importing this module does not import torch.
    from torch import nn

    class LogitsAndFeatures(nn.Module):
        def __init__(self, to_features: nn.Module, to_logits: nn.Module):
            super().__init__()
            self.to_features = to_features
            self.to_logits = to_logits

        def forward(self, x: Any) -> tuple[Any, Any]:
            features = self.to_features(x)
            return self.to_logits(features), features

    return LogitsAndFeatures


def with_features(model: Any) -> Any | None:
    """The model as a module giving (logits, pooled features), or None if it is not shaped like
    fastai's `vision_learner` models (any other export is then served without a detector)."""
    from fastai.layers import Flatten
    from torch import nn

    if not isinstance(model, nn.Sequential) or len(model) != 2 or not isinstance(model[1], nn.Sequential):
        return None
    body, head = model[0], model[1]
    flatten = next((i for i, layer in enumerate(head) if isinstance(layer, (nn.Flatten, Flatten))), None)
    if flatten is None or flatten == len(head) - 1:
        return None
    wrapper = _wrapper_class()(nn.Sequential(body, *head[: flatten + 1]), nn.Sequential(*head[flatten + 1:]))
    return wrapper.eval()


def penultimate(wrapper: Any, features: Any) -> Any:
    """The head's last hidden activation (the input of its final Linear), for comparing detectors."""
    return wrapper.to_logits[:-1](features)
