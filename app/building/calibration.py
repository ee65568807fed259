"""Temperature scaling: probabilities that mean what they say.

A fine-tuned network is usually over- or under-confident (label smoothing makes it under-confident
on purpose). One scalar temperature T, fitted on the validation split by minimising its negative
log-likelihood, divides the logits; folded into the final `Linear` layer, it changes what
`learn.predict` (and so the server) returns without changing any ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

ECE_BINS = 15
# Below this many validation photos, or with none misclassified, the NLL keeps falling as the
# temperature goes to 0 (every answer right, so more confidence always "helps"): nothing to fit.
MIN_IMAGES = 50


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(targets)), targets].mean())


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width
    confidence bins weighted by how many predictions fall in each."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the validation NLL (searched on log T, between 0.05 and 20)."""
    result = minimize_scalar(lambda log_t: nll(logits, targets, float(np.exp(log_t))),
                             bounds=(np.log(0.05), np.log(20)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


@dataclass(frozen=True)
class Calibration:
    temperature: float
    applied: bool  # kept only if it lowered both the validation NLL and ECE, and could be fitted at all
    photos: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    note: str = ""
    fitted_on: str = "validation split"

    def describe(self) -> dict[str, Any]:
        return {"method": f"temperature scaling, fitted on the {self.fitted_on} (NLL), folded into the last Linear",
                "photos": self.photos, "fitted_on": self.fitted_on,
                "temperature": round(self.temperature, 4), "applied": self.applied, "note": self.note,
                "valid_nll": {"before": round(self.nll_before, 4), "after": round(self.nll_after, 4)},
                "valid_ece": {"before": round(self.ece_before, 4), "after": round(self.ece_after, 4),
                              "bins": ECE_BINS}}


def calibrate(logits: np.ndarray, targets: np.ndarray, fitted_on: str = "validation split") -> Calibration:
    """Fit a temperature and say whether it improves the NLL and ECE of these photos (the
    `fitted_on` ones: photos the model gave these logits for without training on them)."""
    errors = int((logits.argmax(axis=1) != targets).sum())
    if len(targets) < MIN_IMAGES or errors == 0:
        nll_now = nll(logits, targets)
        ece_now = expected_calibration_error(np.exp(log_softmax(logits.astype(np.float64), axis=1)), targets)
        return Calibration(1.0, False, len(targets), nll_now, nll_now, ece_now, ece_now,
                           f"not fitted: {len(targets)} photos ({fitted_on}), {errors} misclassified (needs at least "
                           f"{MIN_IMAGES} and one mistake)", fitted_on)
    t = fit_temperature(logits, targets)
    probs_before = np.exp(log_softmax(logits.astype(np.float64), axis=1))
    probs_after = np.exp(log_softmax(logits.astype(np.float64) / t, axis=1))
    before = nll(logits, targets), expected_calibration_error(probs_before, targets)
    after = nll(logits, targets, t), expected_calibration_error(probs_after, targets)
    applied = after[0] < before[0] and after[1] < before[1]
    return Calibration(t, applied, len(targets), before[0], after[0], before[1], after[1],
                       "" if applied else f"not applied: it did not lower both the NLL and ECE of the {fitted_on}",
                       fitted_on)


def fold_temperature(model: Any, temperature: float) -> None:
    """Divide the last `Linear` layer's weight and bias by `temperature`: logits / T, with no new
    layer, so the export stays an ordinary fastai model."""
    import torch
    from torch import nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("the model has no Linear layer to fold a temperature into")
    with torch.no_grad():
        last[-1].weight.div_(temperature)
        if last[-1].bias is not None:
            last[-1].bias.div_(temperature)
