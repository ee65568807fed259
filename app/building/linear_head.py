"""The head as a well-regularised linear model on the frozen pretrained body's pooled features.

On a few hundred photos a class, logistic regression on the features the pretrained body already
gives beat training fastai's two-layer head by gradient descent (README, "The default model"). The
learner is built with a head of fastai's own pooling and one `Linear` (`recipe.new_learner`), the
regression is fitted on the training photos' pooled features (the server's preprocessing, no
augmentation; its C chosen by cross-validation on the training photos only), and its weights,
with the feature standardisation folded in, become that `Linear`'s: an ordinary fastai export.

The same folds give every training photo an out-of-fold answer (the logits of the model fitted on
the other folds, at the chosen C) and say which fold it was held out in, so that the temperature
and the unfamiliar-image detector's thresholds can rest on every photo, not only on the validation
split, which on a student's 50 photos a class is a dozen photos (`app.building.finish`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.building.measure import Outputs, predict_files
from app.learner.compile import build_predictor

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
FOLDS = 5


@dataclass
class OutOfFold:
    """Each training photo's answer from the head fitted without its fold (`Outputs.files` order)."""

    logits: np.ndarray  # (n, classes)
    fold: np.ndarray  # (n,) the fold each photo was held out in
    targets: np.ndarray  # (n,) its class


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. n-1) each photo is held out in: stratified, shuffled with `seed`, and no more
    folds than the smallest class has photos."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(max(2, min(folds, int(np.bincount(labels).min()))), shuffle=True, random_state=seed)
    fold_of = np.zeros(len(labels), dtype=int)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held] = i
    return fold_of


def two_logits(scores: np.ndarray) -> np.ndarray:
    """scikit-learn's one score of a two-class model as the two logits softmax needs (their
    difference is the score, as the folded weights give)."""
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def fit_linear_head(learn: Any, train_files: list[Path], threads: int,
                    seed: int) -> tuple[dict[str, Any], float, Outputs, OutOfFold]:
    """Fit the learner's final Linear as logistic regression on the training photos' pooled
    features; what was chosen, the seconds it took, those features (which the head does not
    change: the unfamiliar-image detector's reference photos are the same) and the out-of-fold
    answers."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, PredefinedSplit, cross_val_predict
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    vocab = [str(v) for v in learn.dls.vocab]
    learn.model.eval()
    predictor = build_predictor(learn, threads, backend="torch", with_features=True)
    outputs = predict_files(predictor, None, train_files)
    labels = np.array([vocab.index(p.parent.name) for p in outputs.files])
    scaler = StandardScaler().fit(outputs.features)
    fold_of = stratified_folds(labels, FOLDS, seed)
    folds = PredefinedSplit(fold_of)
    # C by cross-validated log-loss, not accuracy: on a small, easy set every C is 100% right, and
    # GridSearchCV then takes the first, the strongest regularisation, whose probabilities say
    # 70% for answers that are right 98% of the time (README, "A student's small dataset").
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": list(C_GRID)}, cv=folds, n_jobs=1,
                          scoring={"log_loss": "neg_log_loss", "accuracy": "accuracy"}, refit="log_loss")
    standardised = scaler.transform(outputs.features)
    search.fit(standardised, labels)
    model = search.best_estimator_
    scores = cross_val_predict(LogisticRegression(max_iter=5000, C=model.C), standardised, labels, cv=folds,
                               method="decision_function")
    out_of_fold = OutOfFold(two_logits(scores), fold_of, labels)
    # logits = coef @ ((x - mean) / scale) + intercept = (coef / scale) @ x + (intercept - coef @ (mean / scale))
    weight = model.coef_ / scaler.scale_
    bias = model.intercept_ - weight @ scaler.mean_
    if weight.shape[0] == 1:  # two classes: scikit-learn fits one logit; softmax needs both
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    linear = learn.model[1][-1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    chosen = {"method": "logistic regression on the frozen body's pooled features (standardised)",
              "C": float(search.best_params_["C"]), "C_grid": list(C_GRID),
              "chosen_by": "cross-validated log-loss on the training photos",
              "cv_log_loss_on_training_photos": round(float(-search.best_score_), 4),
              "cv_accuracy_on_training_photos": round(
                  float(search.cv_results_["mean_test_accuracy"][search.best_index_]), 4),
              "folds": folds.get_n_splits()}
    return chosen, time.perf_counter() - start, outputs, out_of_fold
