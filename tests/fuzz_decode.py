"""atheris fuzz target for `decode_image`: any input either decodes to RGB or raises ApiError.

Run by tests/test_hardening.py with a bounded `-runs=N`; by hand: `python tests/fuzz_decode.py`.
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from app.errors import ApiError
    from app.images import decode_image


def fuzz_one(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except ApiError as exc:
        assert exc.status in (413, 415), exc.status
        return
    assert img.mode == "RGB"


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()
