"""The image formats this project reads: the one list that serving, training, evaluation and
cleaning all use, so that a photo is either read everywhere or refused everywhere.

Formats a parent's phone or browser produces. Restricting Pillow to these keeps its rarely used,
historically buggy decoders (TIFF's libtiff, PSD, EPS, ...) away from untrusted input; a TIFF in a
class folder is refused by `app.train` with the same message an upload of it gets, rather than
trained on and then left out of every figure measured the server's way.
"""

from __future__ import annotations

# Pillow's format name -> the file suffixes photos of that format carry. (The JPEG opener also
# reads MPO, the multi-picture JPEG many phones write.)
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "HEIF": (".heic", ".heif"),
    "AVIF": (".avif",),
    "BMP": (".bmp",),
}
READ_FORMATS: tuple[str, ...] = tuple(FORMAT_SUFFIXES)
READ_SUFFIXES: frozenset[str] = frozenset(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)
# Suffixes of image files people keep that are deliberately not read (see the docstring): listed
# so that a folder of photos reports them as refused instead of silently passing over them.
REFUSED_SUFFIXES: frozenset[str] = frozenset({".tif", ".tiff", ".psd", ".eps", ".ico", ".jp2", ".tga"})
# What an error message names: the formats a person would recognise.
NAMED_FORMATS = "JPEG, PNG, WebP, GIF or HEIC"


def suffix_for(pillow_format: str | None) -> str | None:
    """The file suffix to save a photo of this Pillow format under, None if it is not read."""
    if pillow_format == "MPO":
        pillow_format = "JPEG"
    suffixes = FORMAT_SUFFIXES.get(pillow_format or "")
    return suffixes[0] if suffixes else None
