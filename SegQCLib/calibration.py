"""Calibrated intervals on pseudo-scores: Mondrian split conformal on held-out residuals.

A bare pseudo-score hides how far it can be off. Each model card may carry a ``calibration``
(written by ``segqc calibrate``) fitted on the model's held-out evaluation data: for every level
(``volume``, ``slice``) and metric (``dsc``, ``hd95``, ...) the residuals ``true - predicted`` are
grouped by the input's domain (``in`` / ``out`` of the card's domain, e.g. a structure name the
model was trained on or not) and by bins of the predicted score (Mondrian conformal: coverage
holds within each group, not only on average), and each group keeps the lower and upper
conformal quantiles of its residuals. At inference the interval is ``[pred + q_lo, pred + q_hi]``,
clipped to the metric's range.

Why this method: split conformal prediction is distribution-free and needs only exchangeable
held-out pairs, which every model's evaluation already produces; conditioning on the predicted
score matters because errors are not uniform (an empty mask predicted 0.02 is nearly always right,
a mid-range score is not), and conditioning on the domain matters because out-of-domain inputs
(unseen structures) err far more. Distances (HD95, MHD95, ASD) are calibrated on ``log1p`` so
the interval widens with the distance, as their errors do.

The coverage a card states is measured on data the calibration did not see: grouped K-fold
cross-fitting by case (the exchangeable unit split conformal promises coverage for) and, stricter,
by structure, so that no structure is in both the fitted and the measured part
(:func:`cross_fitted_coverage`).

Pure NumPy; no torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Nominal coverage of the intervals unless a card says otherwise.
DEFAULT_COVERAGE = 0.9
#: Metrics in [0, 1] (overlap scores); every other metric is a distance in [0, inf).
BOUNDED_METRICS = ("dsc", "seg", "iou", "nemhd", "seg_objects")
#: Fewest pairs a predicted-score bin keeps; with fewer the bin is merged with its neighbour.
MIN_PER_BIN = 40
#: Fewest pairs a domain needs for a group of its own (19 give finite 90 % bounds; 20 leave a margin).
MIN_PER_DOMAIN = 20
METHOD = ("split conformal (Mondrian: by domain and by bins of the predicted score) on held-out residuals; "
          "distances on log1p")


def _is_bounded(metric: str) -> bool:
    return metric in BOUNDED_METRICS


def _transform(metric: str, values: np.ndarray) -> np.ndarray:
    return values if _is_bounded(metric) else np.log1p(np.maximum(values, 0.0))


def _inverse(metric: str, values: np.ndarray) -> np.ndarray:
    return values if _is_bounded(metric) else np.expm1(values)


def conformal_bounds(residuals: np.ndarray, coverage: float) -> tuple[float, float]:
    """Lower and upper residual quantiles of a two-sided split-conformal interval.

    With n residuals sorted ascending, the upper bound is the ``ceil((n + 1)(1 - a/2))``-th and the
    lower the ``floor((n + 1) a/2)``-th smallest (a = 1 - coverage): the finite-sample rank that
    guarantees at least ``1 - a/2`` on each side for exchangeable data. A rank beyond the sample
    gives an infinite bound (too few pairs to promise the coverage).
    """
    r = np.sort(np.asarray(residuals, float))
    n = r.size
    alpha = 1.0 - coverage
    # the 1e-9 keeps float noise (1 - 0.9 = 0.0999...) from moving a rank that is an integer exactly
    hi_rank = math.ceil((n + 1) * (1.0 - alpha / 2.0) - 1e-9)
    lo_rank = math.floor((n + 1) * (alpha / 2.0) + 1e-9)
    hi = float(r[hi_rank - 1]) if 1 <= hi_rank <= n else math.inf
    lo = float(r[lo_rank - 1]) if 1 <= lo_rank <= n else -math.inf
    return lo, hi


def _bin_edges(pred: np.ndarray, min_per_bin: int, max_bins: int) -> list[float]:
    """Inner edges of predicted-score bins holding at least ``min_per_bin`` pairs each (quantile bins)."""
    n_bins = int(max(1, min(max_bins, pred.size // max(min_per_bin, 1))))
    if n_bins <= 1:
        return []
    edges = np.unique(np.quantile(pred, np.linspace(0, 1, n_bins + 1)[1:-1]))
    # ties can leave a bin short: drop edges until every bin holds enough
    while edges.size:
        counts = np.bincount(np.searchsorted(edges, pred, side="right"), minlength=edges.size + 1)
        if counts.min() >= min_per_bin:
            break
        edges = np.delete(edges, min(int(np.argmin(counts)), edges.size - 1))
    return [float(e) for e in edges]


@dataclass
class ScoreCalibration:
    """Calibration of one (level, metric): per domain, predicted-score bin edges and residual bounds.

    ``groups[domain] = {"edges": [e1, ...], "lo": [...], "hi": [...], "n": [...]}`` with one lo/hi/n per
    bin (residuals on the metric's scale: raw for overlaps, log1p for distances). ``all`` is the pooled
    group, used for a domain the calibration has too few pairs of.
    """

    metric: str
    groups: dict[str, dict[str, list[float]]]

    @classmethod
    def fit(cls, metric: str, pred: Sequence[float], true: Sequence[float], domain: Sequence[str] | None = None,
            coverage: float = DEFAULT_COVERAGE, min_per_bin: int = MIN_PER_BIN, max_bins: int = 5) -> "ScoreCalibration":
        """Fit on held-out pairs (NaN / infinite pairs are dropped)."""
        pred, true = np.asarray(pred, float), np.asarray(true, float)
        domain = np.asarray(domain if domain is not None else ["in"] * pred.size, dtype=object)
        ok = np.isfinite(pred) & np.isfinite(true)
        pred, true, domain = pred[ok], true[ok], domain[ok]
        groups: dict[str, dict[str, list[float]]] = {}
        for name in ["all"] + sorted({str(d) for d in domain}):
            sel = np.ones(pred.size, bool) if name == "all" else domain == name
            if name != "all" and sel.sum() < min(min_per_bin, MIN_PER_DOMAIN):
                continue
            if not sel.any():
                continue
            p, t = _transform(metric, pred[sel]), _transform(metric, true[sel])
            edges = _bin_edges(p, min_per_bin, max_bins)
            which = np.searchsorted(np.asarray(edges), p, side="right")
            lo, hi, n = [], [], []
            for b in range(len(edges) + 1):
                bounds = conformal_bounds(t[which == b] - p[which == b], coverage)
                lo.append(bounds[0])
                hi.append(bounds[1])
                n.append(int(np.sum(which == b)))
            groups[name] = {"edges": edges, "lo": lo, "hi": hi, "n": n}
        return cls(metric, groups)

    def interval(self, pred: float | np.ndarray, domain: str = "in") -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) for predicted value(s) ``pred`` of an input in ``domain``, clipped to the metric's range."""
        group = self.groups.get(domain) or self.groups.get("all")
        p = np.asarray(pred, float)
        if group is None:
            return np.full(p.shape, -math.inf), np.full(p.shape, math.inf)
        tp = _transform(self.metric, p)
        which = np.searchsorted(np.asarray(group["edges"], float), tp, side="right")
        lo = _inverse(self.metric, tp + np.asarray(group["lo"], float)[which])
        hi = _inverse(self.metric, tp + np.asarray(group["hi"], float)[which])
        top = 1.0 if _is_bounded(self.metric) else math.inf
        nan = ~np.isfinite(p)
        lo = np.where(nan, math.nan, np.clip(lo, 0.0, top))
        hi = np.where(nan, math.nan, np.clip(hi, 0.0, top))
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "groups": {d: {k: [_finite_or_str(x) for x in v] for k, v in g.items()}
                                                  for d, g in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScoreCalibration":
        groups = {d: {k: [float(x) for x in v] for k, v in g.items()} for d, g in data["groups"].items()}
        return cls(str(data["metric"]), groups)


def _finite_or_str(x: float) -> float | str:
    """JSON has no infinity: an unbounded side is written as the string "inf" / "-inf"."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass
class Calibration:
    """Every (level, metric) calibration of one model, at one nominal coverage."""

    coverage: float
    scores: dict[str, dict[str, ScoreCalibration]]  # level -> metric -> calibration
    method: str = METHOD

    def interval(self, level: str, metric: str, pred: float | np.ndarray, domain: str = "in"):
        """(lo, hi) arrays, or None when this (level, metric) is not calibrated."""
        cal = self.scores.get(level, {}).get(metric)
        return None if cal is None else cal.interval(pred, domain)

    def has_domain(self, domain: str) -> bool:
        """Whether every calibrated score has pairs of ``domain`` of its own (else the pooled group serves,
        and the interval was not measured on such inputs)."""
        return all(domain in cal.groups for by in self.scores.values() for cal in by.values())

    def to_dict(self) -> dict[str, Any]:
        return {"coverage": self.coverage, "method": self.method,
                "scores": {lvl: {m: c.to_dict() for m, c in by.items()} for lvl, by in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Calibration | None":
        """The calibration of a card's ``calibration`` entry; None for a card without one."""
        if not data or "scores" not in data:
            return None
        return cls(float(data["coverage"]),
                   {lvl: {m: ScoreCalibration.from_dict(c) for m, c in by.items()} for lvl, by in data["scores"].items()},
                   str(data.get("method", METHOD)))


# --------------------------------------------------------------------------- applying to results
def annotate_scores(volume: dict[str, Any], rows: list[dict[str, Any]], calibration: Calibration | None,
                    domain: str = "in", row_level: str = "slice") -> dict[str, Any] | None:
    """Add ``<metric>_lo`` / ``<metric>_hi`` beside every calibrated score, in place: of ``volume``
    (level ``volume``) and of each row of ``rows`` (level ``row_level``: slices, or QANet's patches).

    Returns what the intervals are (``{"coverage", "domain", "method", "domain_calibrated"}``) for the
    result's extras, or None for a model without a calibration (no interval is made up).
    ``domain_calibrated`` is False when the calibration holds no pairs of the input's domain: the
    pooled interval then serves, and it was never measured on such inputs."""
    if calibration is None:
        return None
    for metric in [k for k in volume if not k.endswith(("_lo", "_hi"))]:
        bounds = calibration.interval("volume", metric, volume[metric], domain)
        if bounds is not None:
            volume[f"{metric}_lo"], volume[f"{metric}_hi"] = float(bounds[0]), float(bounds[1])
    for metric in sorted({k for row in rows for k in row}):
        values = np.array([row.get(metric, math.nan) if isinstance(row.get(metric), (int, float)) else math.nan
                           for row in rows], float)
        bounds = calibration.interval(row_level, metric, values, domain)
        if bounds is None:
            continue
        for row, lo, hi in zip(rows, *bounds):
            if metric in row:
                row[f"{metric}_lo"], row[f"{metric}_hi"] = float(lo), float(hi)
    return {"coverage": calibration.coverage, "domain": domain, "method": calibration.method,
            "domain_calibrated": calibration.has_domain(domain)}


def annotate_result(result, calibration: Calibration | None, domain: str = "in") -> None:
    """:func:`annotate_scores` on a :class:`~SegQCLib.qc.QCResult`'s volume and slices; the interval's
    description goes to ``result.extra["interval"]``."""
    info = annotate_scores(result.volume, result.slices, calibration, domain)
    if info is not None:
        result.extra["interval"] = info


# --------------------------------------------------------------------------- fitting and measuring
@dataclass
class Pairs:
    """Held-out (predicted, true) pairs of one (level, metric) with what each pair belongs to.

    pred, true: (N,) floats. domain: (N,) "in"/"out". split: (N,) evaluation split names. case: (N,)
    id of the scored case (a slice pair carries its volume's id, so a volume's slices are never split
    between fitting and measuring). structure: (N,) "split/structure" of the case."""

    pred: np.ndarray
    true: np.ndarray
    domain: np.ndarray
    split: np.ndarray
    case: np.ndarray
    structure: np.ndarray

    @classmethod
    def from_lists(cls, pred, true, domain, split, case, structure) -> "Pairs":
        return cls(np.asarray(pred, float), np.asarray(true, float), *(np.asarray(v, dtype=object)
                                                                        for v in (domain, split, case, structure)))

    def subset(self, sel: np.ndarray) -> "Pairs":
        return Pairs(self.pred[sel], self.true[sel], self.domain[sel], self.split[sel], self.case[sel],
                     self.structure[sel])


class PairCollector:
    """Gathers held-out pairs per (level, metric) while an evaluation runs; :meth:`pairs` gives them as
    ``{level: {metric: Pairs}}``, in the order they were added."""

    _FIELDS = ("pred", "true", "domain", "split", "case", "structure")

    def __init__(self) -> None:
        self._lists: dict[str, dict[str, dict[str, list]]] = {}

    def add(self, level: str, metric: str, pred, true, domain, split, case, structure) -> None:
        """Add one pair or several: ``pred`` and ``true`` scalars or sequences of one length; each of the
        others a scalar (the same for all) or a sequence of that length."""
        pred, true = np.atleast_1d(np.asarray(pred, float)), np.atleast_1d(np.asarray(true, float))
        into = self._lists.setdefault(level, {}).setdefault(metric, {k: [] for k in self._FIELDS})
        into["pred"] += pred.tolist()
        into["true"] += true.tolist()
        for key, value in zip(self._FIELDS[2:], (domain, split, case, structure)):
            into[key] += list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value] * pred.size

    def pairs(self) -> dict[str, dict[str, Pairs]]:
        return {lvl: {m: Pairs.from_lists(*(d[k] for k in self._FIELDS)) for m, d in by.items()}
                for lvl, by in self._lists.items()}


def _covered(cal: ScoreCalibration, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """(inside, width) per pair, domain by domain."""
    inside, width = np.zeros(pairs.pred.size, bool), np.zeros(pairs.pred.size)
    for d in set(pairs.domain.tolist()):
        sel = pairs.domain == d
        lo, hi = cal.interval(pairs.pred[sel], str(d))
        inside[sel] = (pairs.true[sel] >= lo - 1e-9) & (pairs.true[sel] <= hi + 1e-9)
        width[sel] = hi - lo
    return inside, width


def cross_fitted_coverage(metric: str, pairs: Pairs, coverage: float = DEFAULT_COVERAGE, folds: int = 5,
                          seed: int = 0, min_per_bin: int = MIN_PER_BIN, by: str = "case") -> dict[str, dict[str, float]]:
    """Empirical coverage and width on data the calibration did not see, per split and overall.

    The units ``by`` (``"case"``: scored volumes, the exchangeable units split conformal assumes;
    ``"structure"``: every case of one structure together, the stricter question of a structure
    the calibration never saw) are dealt at random into ``folds`` folds; each fold is measured with
    a calibration fitted on the other folds. Returns ``{split: {"coverage", "mean_width",
    "median_width", "n", "share_unbounded"}}`` plus ``"all"``; widths in the metric's units."""
    ok = np.isfinite(pairs.pred) & np.isfinite(pairs.true)
    pairs = pairs.subset(ok)
    units = pairs.case if by == "case" else pairs.structure
    groups = sorted(set(units.tolist()))
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(groups, rng.permutation(len(groups)) % max(2, min(folds, len(groups)))))
    fold = np.array([fold_of[g] for g in units])
    inside, width = np.zeros(pairs.pred.size, bool), np.zeros(pairs.pred.size)
    for f in np.unique(fold):
        fit_part, test_part = pairs.subset(fold != f), pairs.subset(fold == f)
        cal = ScoreCalibration.fit(metric, fit_part.pred, fit_part.true, fit_part.domain, coverage, min_per_bin)
        inside[fold == f], width[fold == f] = _covered(cal, test_part)
    out = {}
    for split in ["all"] + sorted(set(pairs.split.tolist())):
        sel = np.ones(pairs.pred.size, bool) if split == "all" else pairs.split == split
        finite = sel & np.isfinite(width)
        out[split] = {"coverage": float(inside[sel].mean()), "n": int(sel.sum()),
                      "mean_width": float(width[finite].mean()) if finite.any() else math.inf,
                      "median_width": float(np.median(width[finite])) if finite.any() else math.inf,
                      "share_unbounded": float(1.0 - finite[sel].mean())}
    return out


def fit_calibration(pairs: Mapping[str, Mapping[str, Pairs]], coverage: float = DEFAULT_COVERAGE,
                    min_per_bin: int = MIN_PER_BIN) -> tuple[Calibration, dict[str, Any]]:
    """Fit every (level, metric) on all its pairs and measure the cross-fitted coverage.

    ``pairs[level][metric]``. Returns the calibration and ``{level: {metric: coverage report}}``."""
    scores: dict[str, dict[str, ScoreCalibration]] = {}
    measured: dict[str, Any] = {}
    for level, by_metric in pairs.items():
        for metric, p in by_metric.items():
            scores.setdefault(level, {})[metric] = ScoreCalibration.fit(metric, p.pred, p.true, p.domain, coverage,
                                                                        min_per_bin)
            # held out by structure only where there are several structures to hold out
            units = ("case", "structure") if len(set(p.structure.tolist())) > 1 else ("case",)
            measured.setdefault(level, {})[metric] = {
                by: cross_fitted_coverage(metric, p, coverage, min_per_bin=min_per_bin, by=by) for by in units}
    return Calibration(coverage, scores), measured


__all__ = ["Calibration", "ScoreCalibration", "Pairs", "PairCollector", "annotate_scores", "annotate_result", "fit_calibration", "cross_fitted_coverage",
           "conformal_bounds", "DEFAULT_COVERAGE"]
