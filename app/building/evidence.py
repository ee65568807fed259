"""Whether a training run's figures rest on enough photos to mean anything, said in plain words.

A student's 50 photos a class leave a validation split of about 20: its accuracy can be off by
ten points either way, and a detector threshold set on it can promise "flags 0% of real photos"
and flag a quarter of new ones. `warnings_for` reads the model card and returns one line for each
figure that rests on too few photos, with the range it could really be in; `app.train` prints them
and writes them into the card (`"warnings"`).
"""

from __future__ import annotations

import math
from typing import Any

# Below this many photos a share (accuracy, a flagged rate) is uncertain by more than about
# five points either way at 95%: the figure is printed with its interval and a warning.
ENOUGH_PHOTOS = 100
# Fewer training photos than this in a class: its answers and flags rest on little.
FEW_PER_CLASS = 30
Z_95 = 1.96


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a share `successes / n` (95% by default): sound near 0 and 1,
    where the plain normal one is not."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _share(rate: float, n: int) -> str:
    low, high = wilson_interval(round(rate * n), n)
    return f"{rate:.1%} rests on {n} photos: it could be anywhere from {low:.0%} to {high:.0%}"


def warnings_for(card: dict[str, Any]) -> list[str]:
    """One plain line for each figure of the card that its data is too small to back."""
    found = []
    valid = card["valid_images"]
    if valid < ENOUGH_PHOTOS:
        found.append(f"validation accuracy {_share(card['valid_accuracy'], valid)}; measure it on new photos with "
                     "python -m app.evaluate")
    few = {cls: n for cls, n in card["images_per_class"].items() if n < FEW_PER_CLASS}
    if few:
        listed = ", ".join(f"{cls} ({n})" for cls, n in few.items())
        found.append(f"few photos of {listed}: answers and unfamiliar flags for them rest on little; "
                     f"{FEW_PER_CLASS} or more a class is better")
    calibration = card.get("calibration")
    if calibration and not calibration["applied"] and calibration["note"].startswith("not fitted"):
        found.append(f"probabilities not calibrated ({calibration['note']}): they may say more or less than "
                     "the model knows")
    detector = card.get("detector")
    if detector and detector["valid_images"] < ENOUGH_PHOTOS:
        rate = _share(detector["valid_false_flag_rate"], detector["valid_images"])
        # Measured (README, "A student's small dataset"): with no photos of no class to learn from, a
        # small set's k-NN test alone let 38-74% of look-alikes (bears) through, 1-38% joined with its
        # ImageNet test (the default at that size); with them (the outlier test), 1-23%.
        how_often = "sometimes" if detector.get("imagenet_test") else "often"
        look_alikes = ("" if detector.get("outlier_exposure") else
                       f"; without photos of no class to learn from, it {how_often} takes look-alikes for familiar: "
                       "give some with --unfamiliar OTHER --outlier-exposure")
        found.append(f"the unfamiliar-image detector's thresholds were set on {detector['valid_images']} photos: "
                     f"its rate of flagging real photos ({rate}) is a guess until measured on new photos{look_alikes}")
    return found
