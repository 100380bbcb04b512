"""Agreement between predicted and true quality scores: LCC, SROCC, MAE, MAP@k (Quality Sentinel).

MAP@k (Sentinel paper, "Ablation Study"): for each class, the k samples with the lowest TRUE DSC are
the relevant ones (with ties at the k-th value, all tied samples); samples are ranked by PREDICTED DSC, lowest first, and AP@k is the average
precision over the first k of that ranking, AP@k = (1/k) sum_{i<=k} P@i * rel_i, where rel_i = 1 when
the i-th ranked sample is relevant and P@i is the share of relevant samples among the first i.
MAP@k is the mean AP@k over classes with more than k samples.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def average_precision_at_k(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """AP@k of finding the k lowest-true samples by ranking on the prediction (both (n,)).

    Ties: every sample whose true value is not above the k-th lowest counts as relevant, so the
    result does not depend on the storage order of equal truths (many masks have DSC exactly 0).
    """
    kth = np.sort(true)[min(k, len(true)) - 1]
    relevant = set(np.flatnonzero(true <= kth).tolist())
    ranked = np.argsort(pred, kind="stable")[:k]
    hits, total = 0, 0.0
    for i, idx in enumerate(ranked, start=1):
        if int(idx) in relevant:
            hits += 1
            total += hits / i
    return total / k


def mean_average_precision_at_k(pred: np.ndarray, true: np.ndarray, classes: Sequence, k: int) -> float:
    """MAP@k over classes (only classes with more than k samples count; NaN when none does)."""
    pred, true, classes = np.asarray(pred), np.asarray(true), np.asarray(classes)
    aps = [average_precision_at_k(pred[classes == c], true[classes == c], k)
           for c in np.unique(classes) if np.count_nonzero(classes == c) > k]
    return float(np.mean(aps)) if aps else float("nan")


def agreement(pred: Sequence[float], true: Sequence[float], classes: Sequence | None = None) -> dict[str, float]:
    """LCC (Pearson r), SROCC (Spearman), MAE and, with classes, MAP@5 and MAP@10; plus n."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    out = {"n": int(pred.size), "lcc": float("nan"), "srocc": float("nan"),
           "mae": float(np.mean(np.abs(pred - true))) if pred.size else float("nan")}
    if pred.size > 2 and np.std(pred) > 0 and np.std(true) > 0:
        out["lcc"] = float(stats.pearsonr(pred, true)[0])
        out["srocc"] = float(stats.spearmanr(pred, true)[0])
    if classes is not None:
        out["map@5"] = mean_average_precision_at_k(pred, true, classes, 5)
        out["map@10"] = mean_average_precision_at_k(pred, true, classes, 10)
    return out
