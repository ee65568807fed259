"""Decoding untrusted bytes: pure functions, no server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support import image_bytes, png_claiming, synthetic_image

from app.core.images import ImageError, decode_image, to_rgb
from app.serving.errors import STATUSES


def two_colour(width=80, height=60) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation, transpose):
    upright = two_colour()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(transpose)
    decoded = decode_image(image_bytes(stored, "JPEG", exif=exif, quality=95))
    assert decoded.size == upright.size
    left, right = np.asarray(decoded)[30, 5], np.asarray(decoded)[30, 75]
    assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60


def test_transparent_areas_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_grayscale_keeps_its_tones():
    arr = np.full((4, 4), 32768, np.uint16)
    img = decode_image(image_bytes(Image.fromarray(arr), "PNG"))
    assert img.mode == "RGB" and abs(img.getpixel((0, 0))[0] - 128) <= 1


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "RGBA"])
def test_every_mode_becomes_rgb(mode):
    img = synthetic_image((40, 120, 200)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    assert decode_image(image_bytes(img, fmt)).mode == "RGB"


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP", "AVIF"])
def test_formats(fmt):
    assert decode_image(image_bytes(synthetic_image((40, 120, 200)), fmt)).size == (48, 40)


def test_heic_from_iphones():
    import pillow_heif

    heif = pillow_heif.from_pillow(synthetic_image((40, 120, 200), size=(64, 48)))
    import io

    buffer = io.BytesIO()
    heif.save(buffer, quality=90)
    assert decode_image(buffer.getvalue()).size == (64, 48)


def test_first_frame_of_an_animation():
    frames = [synthetic_image(c, size=(32, 32)) for c in ((255, 0, 0), (0, 255, 0))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((16, 16))[0] > 150


@pytest.mark.parametrize("data,status", [
    (b"", 415), (b"plain text", 415), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415),
    (b"%PDF-1.4\n%...", 415), (b"PK\x03\x04zipzip", 415), (png_claiming(60000, 60000), 413),
    (png_claiming(8000, 7000), 413),
])
def test_bad_input_is_a_client_error(data, status):
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert STATUSES[err.value.code] == status


def test_truncated_and_corrupted_images():
    good = image_bytes(synthetic_image((1, 2, 3), size=(200, 150)))
    for bad in (good[:200], good[: len(good) // 2], good[:20] + b"\0" * 500):
        with pytest.raises(ImageError) as err:
            decode_image(bad)
        assert STATUSES[err.value.code] == 415


def test_draft_decodes_big_jpegs_smaller_but_never_below_the_request():
    big = image_bytes(synthetic_image((90, 60, 30), size=(4000, 3000)))
    img = decode_image(big, draft_size=(448, 448))
    assert min(img.size) >= 448 and max(img.size) < 4000
    assert decode_image(big).size == (4000, 3000)
    # Drafting never applies to formats other than JPEG.
    png = image_bytes(synthetic_image((1, 2, 3), size=(1000, 800)), "PNG")
    assert decode_image(png, draft_size=(64, 64)).size == (1000, 800)


def test_tiny_and_extreme_aspect_ratio_images():
    assert decode_image(image_bytes(Image.new("RGB", (1, 1)), "PNG")).size == (1, 1)
    assert decode_image(image_bytes(Image.new("RGB", (5000, 2)), "PNG")).size == (5000, 2)
