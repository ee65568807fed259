"""atheris fuzz target for `decode_image`: any input either decodes to RGB or raises ImageError.

Run by tests/test_hardening.py with a bounded `-runs=N`; by hand: `python tests/fuzz_decode.py`.
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from app.core.images import ImageError, decode_image
from app.serving.errors import STATUSES


def fuzz_one(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except ImageError as exc:
        assert STATUSES[exc.code] in (413, 415), exc.code
        return
    assert img.mode == "RGB"


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()
