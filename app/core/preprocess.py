"""A fastai learner's inference preprocessing, reproduced in Pillow and NumPy.

`app.learner.reproduce` reads the learner's validation-time transforms into a `FastPreprocess`;
its `spec()` is what a compiled model's record keeps, so that a restart (or a server without
torch) rebuilds exactly the same step with `FastPreprocess.from_spec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from PIL import Image

ResizeKind = Literal["crop", "squish", "pad", "rrc", "none"]
RESIZE_KINDS: tuple[ResizeKind, ...] = ("crop", "squish", "pad", "rrc", "none")


@dataclass(frozen=True)
class ResizeStep:
    """fastai `Resize` or `RandomResizedCrop` as applied to the validation set, in Pillow."""

    # crop, squish, pad (Resize methods), rrc (RandomResizedCrop) or none: a learner without either
    # takes every photo at its own size, as fastai feeds it.
    kind: ResizeKind
    size: tuple[int, int]  # (width, height); (0, 0) for none
    resample: int
    val_xtra: float = 0.0

    @property
    def largest_resize(self) -> int:
        if self.kind == "rrc":
            return max(self.size) + _rrc_extra(self.size, self.val_xtra)
        return max(self.size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        tw, th = self.size
        if self.kind == "none":
            return img
        if self.kind == "squish":
            return img.resize((tw, th), self.resample)
        if self.kind == "rrc":
            xtra = _rrc_extra(self.size, self.val_xtra)
            img = img.resize((tw + xtra, th + xtra), self.resample)
            left, top = xtra // 2, xtra // 2
            return img.crop((left, top, left + tw, top + th))
        # Resize crop/pad: the same arithmetic as fastai's Resize.encodes with centred pcts.
        scale = w / tw if (w / tw < h / th) == (self.kind == "crop") else h / th
        cw, ch = int(scale * tw), int(scale * th)
        left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
        if self.kind == "crop":
            return img.crop((left, top, left + cw, top + ch)).resize((tw, th), self.resample)
        canvas = Image.new(img.mode, (cw, ch))  # zero padding
        canvas.paste(img, (-left, -top))
        return canvas.resize((tw, th), self.resample)


def _rrc_extra(size: tuple[int, int], val_xtra: float) -> int:
    # fastai's RandomResizedCrop at validation: resize to size + xtra (a multiple of 8), centre crop.
    return math.ceil(max(size) * val_xtra / 8) * 8


# The image modes a model may take: "RGB", or "L" for fastai's PILImageBW (grayscale, one channel).
MODES = ("RGB", "L")


@dataclass(frozen=True)
class FastPreprocess:
    """Convert to the model's mode, resize, scale to [0, 1] and normalise, to a float32 CHW array.
    Pure and thread-safe."""

    resize: ResizeStep
    divisor: float
    mean: tuple[float, ...]  # one value per channel: three for RGB, one for L
    std: tuple[float, ...]
    mode: str = "RGB"

    @property
    def draft_size(self) -> tuple[int, int] | None:
        # JPEG draft decoding keeps at least three times the largest size the resize step
        # produces, so the antialiased resize that follows sees enough pixels for the same result
        # (tests/test_predictor.py holds the difference on 12 MP photos under 1e-3; the README's
        # Performance section has the measurement). Without a resize, the photo as it is.
        if self.resize.kind == "none":
            return None
        side = 3 * self.resize.largest_resize
        return side, side

    def __call__(self, img: Image.Image) -> np.ndarray:
        if img.mode != self.mode:
            img = img.convert(self.mode)  # as PILImageBW.create opens a photo: Pillow's own luma
        pixels = np.asarray(self.resize(img))
        # Contiguous channel planes first: arithmetic on a transposed view is several times slower.
        planes = (pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        planes = planes.astype(np.float32)
        # The same float32 operations, in the same order, as fastai's IntToFloatTensor and Normalize.
        planes /= np.float32(self.divisor)
        planes -= np.float32(self.mean)[:, None, None]
        planes /= np.float32(self.std)[:, None, None]
        return planes

    def spec(self) -> dict[str, Any]:
        """A JSON-ready description, from which `from_spec` rebuilds an identical step."""
        return {"kind": self.resize.kind, "size": list(self.resize.size), "resample": self.resize.resample,
                "val_xtra": self.resize.val_xtra, "divisor": self.divisor, "mean": list(self.mean),
                "std": list(self.std), "mode": self.mode}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FastPreprocess:
        kind = str(spec["kind"])
        if kind not in RESIZE_KINDS:
            raise ValueError(f"unknown resize kind {kind!r}")
        resize = ResizeStep(cast(ResizeKind, kind), (int(spec["size"][0]), int(spec["size"][1])),
                            int(spec["resample"]), float(spec["val_xtra"]))
        mode = str(spec.get("mode", "RGB"))  # records from before grayscale models were served: RGB
        if mode not in MODES:
            raise ValueError(f"unknown image mode {mode!r}")
        mean, std = per_channel(spec["mean"], mode), per_channel(spec["std"], mode)
        return cls(resize, float(spec["divisor"]), mean, std, mode)


def channels(mode: str) -> int:
    return 1 if mode == "L" else 3


def per_channel(values: Any, mode: str) -> tuple[float, ...]:
    """One float per channel of `mode` (a mean or a standard deviation); ValueError otherwise."""
    floats = tuple(float(v) for v in values)
    if len(floats) != channels(mode):
        raise ValueError(f"{len(floats)} values for the {channels(mode)} channel(s) of mode {mode}")
    return floats
