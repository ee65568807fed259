"""Turning untrusted bytes into an upright RGB Pillow image, or an `ImageError` saying why not.

Pure functions: no server, no model. The decoding policy lives here and nowhere else.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import DomainError
from app.core.formats import NAMED_FORMATS, READ_FORMATS

try:  # iPhones send HEIC; without pillow-heif those uploads get a clear 415 instead.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is in requirements.txt
    pass

Image.init()  # register every plugin now: Image.open(formats=...) looks names up without loading

# We check the pixel count ourselves before decoding (see `decode_image`); Pillow's own check would
# only add a warning to the log for every large photo.
Image.MAX_IMAGE_PIXELS = None


class ImageError(DomainError):
    """Bytes that are not an image this project reads: `unsupported_image` (not an image, or
    corrupt) or `image_too_large` (too many pixels)."""


def unsupported(message: str) -> ImageError:
    return ImageError("unsupported_image", message)


def too_large(message: str) -> ImageError:
    return ImageError("image_too_large", message)


NOT_AN_IMAGE = f"This is not an image we can read. Send a {NAMED_FORMATS} photo."


# Decompression bombs: a few KB of PNG or JPEG can claim billions of pixels.
MAX_PIXELS = 50_000_000


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `data` to an upright RGB image.

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4 or 1/8) while staying at least that
    large: a 12 MP photo decodes in a fraction of the time when the model only needs 224 px.
    """
    if not data:
        raise unsupported("The file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": harmless, and not per-request log material
            img = Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except UnidentifiedImageError:
        raise unsupported(NOT_AN_IMAGE) from None
    except Exception:  # Pillow raises assorted errors on malformed headers.
        raise unsupported("The image header is corrupt.") from None
    width, height = img.size
    if width * height > max_pixels:
        raise too_large(f"The image is {width}x{height} pixels; the limit is {max_pixels // 1_000_000} megapixels.")
    if width < 1 or height < 1:
        raise unsupported("The image has no pixels.")
    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", draft_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # first frame only for animations
            img = _upright(img)
            return to_rgb(img)
    except Exception:  # truncated or corrupt pixel data
        raise unsupported("The image data is corrupt or truncated.") from None


def image_format(data: bytes) -> str | None:
    """Pillow's name for the format of image bytes this project reads (from the header alone), or
    None."""
    try:
        with Image.open(io.BytesIO(data), formats=READ_FORMATS) as img:
            return img.format
    except Exception:  # not an image, or a header Pillow cannot parse
        return None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation: phones often store photos sideways with a rotate-me tag."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of a photo that is already upright
    except Exception:  # broken EXIF must not lose the photo: use it as stored
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a person would expect to see it."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas shown on white, as a browser would, not as Pillow's black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit and float grayscale: Pillow's convert() would clip everything above 255 to white.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(values.max(initial=0)), 1.0)
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def encode_without_metadata(img: Image.Image, quality: int = 92) -> bytes:
    """`img` as a JPEG that carries its pixels and nothing else: no EXIF (so no GPS, camera or
    time), no XMP, no ICC profile, no comment. Decode with `decode_image` first, which has already
    turned the photo upright, so that dropping the orientation tag loses nothing.

    Pillow copies some of `img.info` (the JPEG comment among them) into what it saves; the pixels
    are therefore saved from a fresh image that has no `info` at all."""
    bare = Image.frombytes(img.mode, img.size, img.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
