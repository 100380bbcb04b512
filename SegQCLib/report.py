"""The dataset-curator report of ``segqc batch``: statistics, CSV/JSON lists and one HTML page.

Input is the batch results table (``results.csv``, see :data:`COLUMNS`): one row per
(case, structure, QC model), with the predicted (pseudo) DSC of the QC model, optionally its
interval (``pred_dsc_lo``-``pred_dsc_hi`` at ``interval_coverage``) and whether the case lies in the
model's domain, and, where a reference segmentation exists, the true DSC. Rows whose ``status`` is
not ``"ok"`` are listed as errors and left out of every statistic. Tables written before the
interval, ``domain`` and ``note`` columns existed (a resumed batch) are read as well.

Two layers, kept apart:

- **statistics** (pandas/numpy/scipy, no plotting): :func:`load_table`, :func:`triage` (each row
  ``error`` / ``flag`` / ``uncertain`` / ``pass``), :func:`structure_table` (the SegAE / Quality
  Sentinel dataset table), :func:`method_ranking` and :func:`kendall_taus`, :func:`risk_coverage`
  (risk-coverage curve and AURC of the pseudo-score against the true DSC, as in Zenk et al.'s
  failure-detection benchmark), :func:`risk_threshold` (the threshold a curator picks for a stated
  risk), :func:`report_warnings`, :func:`active_learning_list`, :func:`self_training_list` and
  :func:`summarise` (the numbers of ``summary.json``);
- **the report** (matplotlib Agg figures, HTML): :func:`write_report` writes ``report.html`` (one
  self-contained file: inline CSS, images as base64 PNG, one small inline script that sorts the
  table of all rows; nothing fetched) and the CSV/JSON files beside it, each atomically (temporary
  file in the same folder, then ``os.replace``).

Correlations (Pearson r, Kendall tau) are given only from :data:`MIN_N_CORRELATION` pairs or
methods on: from fewer, r = +-1 says nothing and the report writes "too few".
All DSC values are fractions in [0, 1]; HD95 is in mm; runtimes in seconds.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .io import write_bytes_atomic
from .qc import json_value

#: Columns of the batch results table and their kind (a contract with ``batch.py``). Integer
#: columns use -1 for "none" (``worst_slice``, ``label_value`` of an error row). The interval,
#: ``domain`` and ``note`` columns are newer: older tables lack them and get blanks.
COLUMNS: dict[str, str] = {
    "case_id": "str", "structure": "str", "label_value": "int", "method": "str", "model": "str",
    "pred_dsc": "float", "pred_hd95": "float", "n_slices": "int", "n_flagged": "int", "worst_slice": "int",
    "worst_slice_dsc": "float", "threshold": "float", "true_dsc": "float", "true_hd95": "float",
    "image": "str", "segmentation": "str", "reference": "str", "pgt": "str", "runtime_s": "float",
    "status": "str", "error": "str", "worker": "str",
    "pred_dsc_lo": "float", "pred_dsc_hi": "float", "pred_hd95_lo": "float", "pred_hd95_hi": "float",
    "interval_coverage": "float", "domain": "str", "note": "str", "slice_axis": "int",
}
#: Columns a table must have; the others are filled with "" / NaN / -1 when absent.
REQUIRED_COLUMNS = ("case_id", "structure", "pred_dsc", "status")

#: Columns of ``active_learning.csv`` and ``self_training.csv``.
LIST_COLUMNS = ("rank", "case_id", "structure", "label_value", "method", "model", "pred_dsc", "true_dsc",
                "worst_slice", "worst_slice_dsc", "n_flagged", "image", "segmentation", "reference", "pgt")
#: Columns of ``structures.csv``.
STRUCTURE_COLUMNS = ("structure", "model", "n", "mean_pred_dsc", "share_below", "n_ref", "mean_true_dsc",
                     "share_true_below", "r", "mae")
#: Columns of ``ranking.csv``.
RANKING_COLUMNS = ("model", "method", "n", "mean_pred_dsc", "rank_pred", "n_ref", "mean_true_dsc", "rank_true")

#: Triage states of a row, most urgent first (see :func:`triage`).
STATUSES = ("error", "flag", "uncertain", "pass")
#: Fewest pairs (Pearson r) or ranked methods (Kendall tau) a correlation is computed from.
MIN_N_CORRELATION = 5
TOO_FEW = "too few"
#: Default largest failure rate a curator accepts among the cases kept (:func:`risk_threshold`).
DEFAULT_TARGET_RISK = 0.05
#: A warning is given when more than this share of the scored rows lies outside the model's domain.
OUT_OF_DOMAIN_WARNING_SHARE = 0.5

#: Outline colours of the case views (RGB 0-1) and their line widths (points): the reference is drawn
#: widest and first, the segmentation thinnest and last, so that coinciding outlines stay visible
#: as nested bands (a perfect mask shows yellow on both sides of its red outline).
SEG_COLOUR, SEG_WIDTH = (1.0, 0.0, 0.0), 1.1
PGT_COLOUR, PGT_WIDTH = (0.0, 1.0, 0.0), 2.3
REF_COLOUR, REF_WIDTH = (1.0, 1.0, 0.0), 3.6
#: Colour of the ticks that mark the axial (worst) slice on the coronal and sagittal views.
SLICE_MARK_COLOUR = (0.0, 0.8, 1.0)
#: Curve colours of the risk-coverage figure (chosen to occur nowhere else in the report).
CURVE_COLOURS = {"model": "#7b2d8e", "optimal": "#1b9e77", "random": "#7f7f7f"}
#: Most histograms drawn (structures with the lowest mean predicted DSC first); most error rows shown.
MAX_HISTOGRAMS = 48
MAX_ERRORS_SHOWN = 500
#: Percentiles of the grey window of the case views.
WINDOW_PERCENTILES = (1.0, 99.0)
#: Scale-bar lengths (mm) to choose from: the longest that fits in 35 % of a view's width.
SCALE_BAR_MM = (1, 2, 5, 10, 20, 50, 100, 200, 500)


# =========================================================================== statistics
def _text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def parse_floats(values: pd.Series) -> pd.Series:
    """Text cells of a CSV column as float64, exactly as written: "" and text that is no number -> NaN,
    numbers and NaN cells of a numeric column passed through.

    Written by hand because ``pd.to_numeric`` is not exact: pandas 3.0.6 reads "0.016527635528529094"
    as 0.016527635528529 (measured: 36 % of 200,000 ``repr``-written floats came back changed), so a
    results table read back from its CSV would disagree with the one written. Python's ``float``
    parses every ``repr`` exactly."""
    def number(cell: Any) -> float:
        try:
            return float(cell)
        except (TypeError, ValueError):
            return math.nan

    return pd.Series([number(cell) for cell in values], index=values.index, dtype=float)


def load_table(table: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The results table as a DataFrame with typed columns: every name of :data:`COLUMNS` present,
    text columns as ``str`` ("" for blanks), float columns as float (NaN for blanks), integer
    columns as int (-1 for blanks), ``status`` and ``domain`` lower-case. Extra columns are kept.

    ``table`` is a DataFrame (copied, not changed) or the path of ``results.csv``. Raises
    ValueError naming the missing columns when one of :data:`REQUIRED_COLUMNS` is absent.
    """
    if isinstance(table, (str, Path)):
        df = pd.read_csv(table, dtype=str, keep_default_na=False)
    elif isinstance(table, pd.DataFrame):
        df = table.copy()
    else:
        raise TypeError(f"expected a DataFrame or the path of results.csv, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks column(s) {', '.join(missing)}; "
                         f"expected the columns of segqc batch: {', '.join(COLUMNS)}")
    for name, kind in COLUMNS.items():
        if name not in df.columns:
            df[name] = "" if kind == "str" else (-1 if kind == "int" else np.nan)
        if kind == "str":
            df[name] = df[name].map(_text).astype(object)
        else:
            values = parse_floats(df[name])
            df[name] = values.fillna(-1).round().astype(int) if kind == "int" else values
    for name in ("status", "domain"):
        df[name] = df[name].str.strip().str.lower()
    return df.reset_index(drop=True)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows scored without error (``status == "ok"``): the only ones statistics use."""
    return df[df["status"] == "ok"]


def error_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with any status other than ``"ok"``."""
    return df[df["status"] != "ok"]


def out_of_domain(df: pd.DataFrame) -> pd.Series:
    """Whether each row lies outside the QC model's domain (``domain == "out"``)."""
    return df["domain"] == "out"


def triage(df: pd.DataFrame, threshold: float = 0.8) -> pd.Series:
    """The triage state of each row of a :func:`load_table` table (one of :data:`STATUSES`).

    ``error``: not scored (``status`` is not ok). ``uncertain``: the interval
    ``pred_dsc_lo``-``pred_dsc_hi`` straddles ``threshold`` (lo < threshold <= hi), whichever side
    the point estimate is on, or the row has no predicted DSC: a look decides. ``flag``: predicted
    DSC below ``threshold`` (and its interval, when given, too). ``pass``: the rest. Without interval
    columns (older tables) a row is ``flag`` or ``pass`` by its predicted DSC alone.
    """
    pred, lo, hi = (df[c].to_numpy(float) for c in ("pred_dsc", "pred_dsc_lo", "pred_dsc_hi"))
    with np.errstate(invalid="ignore"):
        straddles = (lo < threshold) & (hi >= threshold)
        below = pred < threshold
    state = np.where(~np.isfinite(pred) | straddles, "uncertain", np.where(below, "flag", "pass"))
    state = np.where(df["status"].to_numpy() != "ok", "error", state)
    return pd.Series(state, index=df.index, dtype=object)


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]


def _mean(values: Any) -> float:
    array = _finite(values)
    return float(array.mean()) if array.size else math.nan


def _share_below(values: Any, threshold: float) -> float:
    """Fraction (0-1) of the finite ``values`` strictly below ``threshold``; NaN when there are none."""
    array = _finite(values)
    return float(np.mean(array < threshold)) if array.size else math.nan


def _pairs(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``true`` as float arrays, kept where both are finite."""
    pred = np.asarray(pred, dtype=float).ravel()
    true = np.asarray(true, dtype=float).ravel()
    keep = np.isfinite(pred) & np.isfinite(true)
    return pred[keep], true[keep]


def agreement(pred: Any, true: Any) -> dict[str, float]:
    """Agreement of predicted with true DSC over the pairs where both are finite.

    Returns ``n_pairs``, ``r`` (Pearson correlation; NaN with fewer than :data:`MIN_N_CORRELATION`
    pairs or a constant side) and ``mae`` (mean absolute error, DSC units; NaN without pairs).
    """
    pred, true = _pairs(pred, true)
    n = int(pred.size)
    mae = float(np.mean(np.abs(pred - true))) if n else math.nan
    r = math.nan
    if n >= MIN_N_CORRELATION and np.ptp(pred) > 0 and np.ptp(true) > 0:
        r = float(np.corrcoef(pred, true)[0, 1])
    return {"n_pairs": n, "r": r, "mae": mae}


def structure_table(df: pd.DataFrame, threshold: float = 0.8) -> pd.DataFrame:
    """The per-structure dataset table (:data:`STRUCTURE_COLUMNS`), one row per (structure, QC model),
    worst mean predicted DSC first.

    ``n``: ok rows with a finite predicted DSC; ``mean_pred_dsc`` and ``share_below`` (fraction of
    them with predicted DSC < ``threshold``). ``n_ref``: ok rows with a finite true DSC;
    ``mean_true_dsc``, ``share_true_below`` likewise; ``r``, ``mae``: :func:`agreement` of
    predicted vs true DSC. ``df`` is a table from :func:`load_table`.
    """
    ok = ok_rows(df)
    rows = []
    for (structure, model), group in ok.groupby(["structure", "model"], sort=True):
        pred, true = group["pred_dsc"].to_numpy(float), group["true_dsc"].to_numpy(float)
        agree = agreement(pred, true)
        rows.append({
            "structure": structure, "model": model, "n": int(_finite(pred).size), "mean_pred_dsc": _mean(pred),
            "share_below": _share_below(pred, threshold), "n_ref": int(_finite(true).size),
            "mean_true_dsc": _mean(true), "share_true_below": _share_below(true, threshold),
            "r": agree["r"], "mae": agree["mae"],
        })
    table = pd.DataFrame(rows, columns=list(STRUCTURE_COLUMNS))
    return table.sort_values(["mean_pred_dsc", "structure", "model"], na_position="last", kind="stable",
                             ignore_index=True)


def method_ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Segmentation methods ranked by mean predicted DSC (:data:`RANKING_COLUMNS`), per QC model.

    Only QC models whose ok rows hold at least 2 distinct non-empty ``method`` values are ranked
    (rows with an empty method are left out). ``rank_pred`` 1 is the highest mean predicted DSC;
    ``rank_true`` the same by mean true DSC (NaN for a method without references). Ties share the
    lowest rank. Means are over all of a method's rows: compare methods run on the same cases.
    """
    ok = ok_rows(df)
    ok = ok[ok["method"] != ""]
    parts = []
    for model, group in ok.groupby("model", sort=True):
        if group["method"].nunique() < 2:
            continue
        rows = [{"model": model, "method": method, "n": int(_finite(g["pred_dsc"]).size),
                 "mean_pred_dsc": _mean(g["pred_dsc"]), "n_ref": int(_finite(g["true_dsc"]).size),
                 "mean_true_dsc": _mean(g["true_dsc"])}
                for method, g in group.groupby("method", sort=True)]
        part = pd.DataFrame(rows)
        part["rank_pred"] = part["mean_pred_dsc"].rank(ascending=False, method="min")
        part["rank_true"] = part["mean_true_dsc"].rank(ascending=False, method="min")
        parts.append(part.sort_values(["rank_pred", "method"], na_position="last", kind="stable"))
    if not parts:
        return pd.DataFrame(columns=list(RANKING_COLUMNS))
    return pd.concat(parts, ignore_index=True)[list(RANKING_COLUMNS)]


def _ranked_methods(group: pd.DataFrame) -> pd.DataFrame:
    """The methods of one QC model's ranking that have both a mean predicted and a mean true DSC."""
    pred, true = group["mean_pred_dsc"].astype(float), group["mean_true_dsc"].astype(float)
    return group[np.isfinite(pred) & np.isfinite(true)]


def kendall_counts(ranking: pd.DataFrame) -> dict[str, int]:
    """Per QC model of ``ranking``, how many methods a Kendall tau is computed over."""
    return {model: len(_ranked_methods(group)) for model, group in ranking.groupby("model", sort=True)}


def kendall_taus(ranking: pd.DataFrame) -> dict[str, float]:
    """Kendall tau-b (``scipy.stats.kendalltau``) between the ranking of methods by mean predicted DSC
    and by mean true DSC, per QC model of ``ranking`` (from :func:`method_ranking`); computed over
    the methods having both means, NaN with fewer than :data:`MIN_N_CORRELATION` such methods or a
    constant side (from 3 methods tau can only be +-1 or +-1/3)."""
    taus: dict[str, float] = {}
    for model, group in ranking.groupby("model", sort=True):
        both = _ranked_methods(group)
        tau = math.nan
        if len(both) >= MIN_N_CORRELATION and both["mean_pred_dsc"].nunique() > 1 \
                and both["mean_true_dsc"].nunique() > 1:
            tau = float(stats.kendalltau(both["mean_pred_dsc"], both["mean_true_dsc"]).statistic)
        taus[model] = tau
    return taus


# --------------------------------------------------------------------------- failure detection
def selective_risks(confidence: Any, risk: Any) -> np.ndarray:
    """Selective risk at the coverages 1/n, 2/n, ..., 1: the mean ``risk`` of the k cases of highest
    ``confidence``, for k = 1..n (finite pairs only; empty without any).

    Cases of equal confidence cannot be told apart by a threshold, so a tie group is kept in
    expectation over its orders: its kept part counts at the group's mean risk."""
    confidence, risk = _pairs(confidence, risk)
    if not confidence.size:
        return np.zeros(0)
    order = np.argsort(-confidence, kind="stable")
    confidence, risk = confidence[order], risk[order]
    _, start, counts = np.unique(-confidence, return_index=True, return_counts=True)
    before = np.concatenate([[0.0], np.cumsum(risk)])[start]  # risk summed over higher groups
    group_mean = np.add.reduceat(risk, start) / counts
    group = np.repeat(np.arange(start.size), counts)
    k = np.arange(1, confidence.size + 1)
    return (before[group] + (k - start[group]) * group_mean[group]) / k


def aurc(confidence: Any, risk: Any) -> float:
    """Area under the risk-coverage curve: the mean of :func:`selective_risks` (each coverage step is
    1/n wide); NaN without pairs. Lower is better."""
    curve = selective_risks(confidence, risk)
    return float(curve.mean()) if curve.size else math.nan


def risk_coverage(pred: Any, true: Any, threshold: float = 0.8) -> dict[str, Any]:
    """How well the predicted DSC ranks cases by their true quality (Zenk et al.'s failure detection).

    Cases are kept by confidence = predicted DSC, highest first. Risk is **1 - true DSC** (the
    generalised risk of the benchmark); the failure risk (true DSC < ``threshold``) is given too.
    Returns ``n`` (pairs with both DSCs), ``risk`` (its name), ``aurc``, ``aurc_optimal`` (the
    oracle, kept by true DSC), ``aurc_random`` (random order: the mean risk at every coverage),
    ``e_aurc`` (aurc - aurc_optimal) and the same four for the failure risk
    (``failure_aurc``...); NaN without pairs.
    """
    pred, true = _pairs(pred, true)
    result: dict[str, Any] = {"n": int(pred.size), "risk": "1 - true DSC"}
    for prefix, risk in (("", 1.0 - true), ("failure_", (true < threshold).astype(float))):
        result[prefix + "aurc"] = aurc(pred, risk)
        result[prefix + "aurc_optimal"] = aurc(-risk, risk)
        result[prefix + "aurc_random"] = _mean(risk)
        result[prefix + "e_aurc"] = result[prefix + "aurc"] - result[prefix + "aurc_optimal"]
    return result


def risk_threshold(pred: Any, true: Any, threshold: float = 0.8,
                   target_risk: float = DEFAULT_TARGET_RISK) -> dict[str, Any]:
    """The predicted-DSC threshold a curator would pick to keep the failure rate at ``target_risk``.

    Among the pairs with both DSCs, a case is accepted when its predicted DSC >= t and failed when its
    true DSC < ``threshold``. ``threshold`` (in the result: ``pred_threshold``) is the lowest t (one of
    the predicted values, so the largest coverage) whose accepted cases fail at a rate <=
    ``target_risk``. Returns ``target_risk``, ``qc_threshold``, ``n``, ``achieved`` (False when no t
    achieves it, or without pairs), ``pred_threshold``, ``coverage`` (accepted share, 0-1),
    ``n_accepted`` and ``failure_rate`` (NaN where not achieved), and ``min_failure_rate``, the lowest
    rate any threshold gives (what can be promised at best).
    """
    pred, true = _pairs(pred, true)
    result: dict[str, Any] = {"target_risk": float(target_risk), "qc_threshold": float(threshold),
                              "n": int(pred.size), "achieved": False, "pred_threshold": math.nan,
                              "coverage": math.nan, "n_accepted": 0, "failure_rate": math.nan,
                              "min_failure_rate": math.nan}
    if not pred.size:
        return result
    order = np.argsort(-pred, kind="stable")
    pred, failed = pred[order], (true[order] < threshold)
    # a threshold accepts whole tie groups: evaluate it at the last case of each group
    last = np.flatnonzero(np.append(pred[1:] != pred[:-1], True))
    accepted = last + 1
    rate = np.cumsum(failed)[last] / accepted
    result["min_failure_rate"] = float(rate.min())
    good = np.flatnonzero(rate <= target_risk)
    if good.size:
        pick = good[-1]
        result.update(achieved=True, pred_threshold=float(pred[last[pick]]), n_accepted=int(accepted[pick]),
                      coverage=float(accepted[pick] / pred.size), failure_rate=float(rate[pick]))
    return result


def report_warnings(df: pd.DataFrame) -> list[dict[str, str]]:
    """Warnings for the top of the report, each ``{"code", "message"}``.

    ``true_dsc_all_zero``: every true DSC is 0 (likely a reference/label mismatch, which makes MAE,
    r and the risk numbers meaningless); ``mostly_out_of_domain``: more than
    :data:`OUT_OF_DOMAIN_WARNING_SHARE` of the scored rows are outside the QC model's domain."""
    ok = ok_rows(df)
    found = []
    true = _finite(ok["true_dsc"])
    if true.size and not np.any(true > 0):
        found.append({"code": "true_dsc_all_zero", "message": (
            f"Every true DSC is 0 ({true.size} row(s) with a reference): the references most likely do not "
            "match the segmentations (label values or names, or the wrong reference files). MAE, r, AURC and "
            "the risk threshold below then measure that mismatch, not the QC model.")})
    out = int(out_of_domain(ok).sum())
    if len(ok) and out / len(ok) > OUT_OF_DOMAIN_WARNING_SHARE:
        found.append({"code": "mostly_out_of_domain", "message": (
            f"{out} of {len(ok)} scored rows ({100 * out / len(ok):.0f} %) lie outside the QC model's domain "
            "(column domain = out): its predicted DSC is not validated for them; check the true DSC of a "
            "sample before trusting the flags.")})
    return found


# --------------------------------------------------------------------------- lists
def _list(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.reset_index(drop=True).copy()
    rows.insert(0, "rank", np.arange(1, len(rows) + 1))
    return rows[list(LIST_COLUMNS)]


def active_learning_list(df: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """The ``n`` ok rows with the lowest predicted DSC, ascending (ties by case, structure, method):
    the segmentations to correct first (:data:`LIST_COLUMNS`)."""
    ok = ok_rows(df)
    ok = ok[np.isfinite(ok["pred_dsc"].astype(float))]
    order = ok.sort_values(["pred_dsc", "case_id", "structure", "method", "model"], kind="stable")
    return _list(order.head(max(int(n), 0)))


def self_training_list(df: pd.DataFrame, threshold: float = 0.8, n: int = 20) -> pd.DataFrame:
    """The ``n`` ok rows with the highest predicted DSC among those with predicted DSC >= ``threshold``,
    descending: pseudo-labels worth keeping for self-training (:data:`LIST_COLUMNS`)."""
    ok = ok_rows(df)
    ok = ok[ok["pred_dsc"].astype(float) >= threshold]
    order = ok.sort_values(["pred_dsc", "case_id", "structure", "method", "model"],
                           ascending=[False, True, True, True, True], kind="stable")
    return _list(order.head(max(int(n), 0)))


def review_rows(df: pd.DataFrame, threshold: float = 0.8, n: int | None = None) -> pd.DataFrame:
    """The ok rows to look at: those :func:`triage` calls ``flag`` or ``uncertain``, lowest predicted
    DSC first (rows without one last), at most ``n`` (all when None). Passing rows never appear."""
    state = triage(df, threshold)
    rows = df[state.isin(["flag", "uncertain"])]
    rows = rows.sort_values(["pred_dsc", "case_id", "structure", "method", "model"], na_position="last",
                            kind="stable")
    return rows if n is None else rows.head(max(int(n), 0))


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: json_value(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _model_numbers(group: pd.DataFrame, threshold: float, target_risk: float) -> dict[str, Any]:
    """The overall numbers of one QC model's ok rows (an entry of ``per_model``)."""
    agree = agreement(group["pred_dsc"], group["true_dsc"])
    return {
        "n": int(_finite(group["pred_dsc"]).size), "mean_pred_dsc": _mean(group["pred_dsc"]),
        "share_below": _share_below(group["pred_dsc"], threshold), "n_ref": agree["n_pairs"],
        "mean_true_dsc": _mean(group["true_dsc"]), "r": agree["r"], "mae": agree["mae"],
        "risk_coverage": risk_coverage(group["pred_dsc"], group["true_dsc"], threshold),
        "risk_threshold": risk_threshold(group["pred_dsc"], group["true_dsc"], threshold, target_risk),
    }


def summarise(table: pd.DataFrame | str | Path, threshold: float = 0.8,
              target_risk: float = DEFAULT_TARGET_RISK) -> dict[str, Any]:
    """The key numbers of a results table (what ``summary.json`` holds), JSON-ready (NaN -> None).

    Keys: ``n_rows``, ``n_ok``, ``n_error``, ``n_cases`` (distinct case ids, all rows),
    ``n_structures`` (distinct structures among ok rows), ``models``, ``methods`` (non-empty,
    sorted), ``threshold``, ``target_risk``; ``triage`` (rows per :data:`STATUSES`),
    ``n_out_of_domain``, ``domain_recorded`` (any ok row has a ``domain``), ``interval_coverage`` (the distinct coverages of the intervals given, 0-1),
    ``warnings`` (:func:`report_warnings`); ``mean_pred_dsc`` and ``share_below`` over all ok rows;
    ``structures``: list of :func:`structure_table` records; ``n_ref``, ``r``, ``mae`` (predicted vs
    true DSC over ok rows with a reference; r None below :data:`MIN_N_CORRELATION` pairs);
    ``risk_coverage`` (:func:`risk_coverage`) and ``risk_threshold`` (:func:`risk_threshold`);
    ``ranking``: :func:`method_ranking` records; ``kendall_tau`` and ``kendall_n`` (methods it is
    over; tau None below :data:`MIN_N_CORRELATION`); ``per_model``: the same overall numbers per QC
    model. With several QC models in the table, the top-level ``r``, ``mae``, ``kendall_tau``,
    ``risk_coverage`` and ``risk_threshold`` are None (mixing models' scores means nothing): read
    them under ``per_model``.
    """
    df = load_table(table)
    ok = ok_rows(df)
    ranking = method_ranking(df)
    taus, counts = kendall_taus(ranking), kendall_counts(ranking)
    per_model = {}
    for model, group in ok.groupby("model", sort=True):
        per_model[model] = _model_numbers(group, threshold, target_risk) | {
            "kendall_tau": taus.get(model, math.nan), "kendall_n": counts.get(model, 0)}
    single = next(iter(per_model.values())) if len(per_model) == 1 else None
    state = triage(df, threshold)
    summary = {
        "n_rows": len(df), "n_ok": len(ok), "n_error": len(df) - len(ok),
        "n_cases": int(df["case_id"].nunique()), "n_structures": int(ok["structure"].nunique()),
        "models": sorted(ok["model"].unique().tolist() or df["model"].unique().tolist()),
        "methods": sorted(m for m in ok["method"].unique().tolist() if m),
        "threshold": float(threshold), "target_risk": float(target_risk),
        "triage": {s: int((state == s).sum()) for s in STATUSES},
        "n_out_of_domain": int(out_of_domain(ok).sum()), "domain_recorded": bool((ok["domain"] != "").any()),
        "interval_coverage": sorted(set(_finite(ok["interval_coverage"]).tolist())),
        "warnings": report_warnings(df),
        "mean_pred_dsc": _mean(ok["pred_dsc"]), "share_below": _share_below(ok["pred_dsc"], threshold),
        "n_ref": int(single["n_ref"]) if single else int(agreement(ok["pred_dsc"], ok["true_dsc"])["n_pairs"]),
        "structures": _records(structure_table(df, threshold)),
        "ranking": _records(ranking),
        "per_model": per_model,
    }
    for key in ("r", "mae", "kendall_tau", "kendall_n", "risk_coverage", "risk_threshold"):
        summary[key] = single[key] if single else None
    return json_value(summary)


# =========================================================================== files
def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    return write_bytes_atomic(path, table.to_csv(index=False, lineterminator="\n"))


# =========================================================================== figures
def _figure(width_in: float, height_in: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_png(pred: Any, title: str, threshold: float) -> str:
    """Histogram of predicted DSC values (bins of 0.05 on [0, 1]) as a PNG data URI."""
    fig = _figure(3.0, 2.1)
    ax = fig.add_subplot()
    ax.hist(np.clip(_finite(pred), 0.0, 1.0), bins=np.linspace(0.0, 1.0, 21), color="#4878a8", edgecolor="white")
    ax.axvline(threshold, color="#c03030", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("predicted DSC", fontsize=7)
    ax.set_ylabel("rows", fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png_uri(fig)


def scatter_png(ok: pd.DataFrame, threshold: float, title: str) -> str:
    """Predicted vs true DSC of ``ok`` rows (coloured by structure when there are at most 10),
    with the identity line and the threshold, as a PNG data URI."""
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    rows = ok[np.isfinite(ok["pred_dsc"].astype(float)) & np.isfinite(ok["true_dsc"].astype(float))]
    structures = sorted(rows["structure"].unique())
    if len(structures) <= 10:
        for structure in structures:
            part = rows[rows["structure"] == structure]
            ax.scatter(part["true_dsc"], part["pred_dsc"], s=18, alpha=0.8, label=structure)
        if structures:
            ax.legend(fontsize=7, loc="lower right", frameon=False)
    else:
        ax.scatter(rows["true_dsc"], rows["pred_dsc"], s=12, alpha=0.6, color="#4878a8")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.axhline(threshold, color="#c03030", linestyle=":", linewidth=0.8)
    ax.axvline(threshold, color="#c03030", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("true DSC")
    ax.set_ylabel("predicted DSC")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png_uri(fig)


def _risk_axes(ax, pred: np.ndarray, risk: np.ndarray, ylabel: str, numbers: dict[str, Any], prefix: str) -> None:
    """One risk-coverage panel: the QC model's curve, the oracle's and the random baseline."""
    n = pred.size
    coverage = np.arange(1, n + 1) / n
    ax.plot(coverage, selective_risks(pred, risk), color=CURVE_COLOURS["model"], linewidth=2.2,
            label=f"QC model (AURC {numbers[prefix + 'aurc']:.3f})")
    ax.plot(coverage, selective_risks(-risk, risk), color=CURVE_COLOURS["optimal"], linewidth=1.6,
            linestyle="--", label=f"optimal (AURC {numbers[prefix + 'aurc_optimal']:.3f})")
    ax.axhline(numbers[prefix + "aurc_random"], color=CURVE_COLOURS["random"], linewidth=1.2, linestyle=":",
               label=f"random (AURC {numbers[prefix + 'aurc_random']:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("coverage (share of cases kept, highest predicted DSC first)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(0, max(ax.get_ylim()[1], 0.05) * 1.05)


def _legend_below(ax) -> None:
    """The axis' legend under it, where it hides no curve."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def risk_coverage_png(pred: Any, true: Any, threshold: float, numbers: dict[str, Any],
                      pick: dict[str, Any], title: str) -> str:
    """Risk-coverage curves as a PNG data URI: left the risk 1 - true DSC, right the failure rate
    (true DSC < ``threshold``) with the curator's target risk and the coverage ``pick`` gives.
    ``numbers``: :func:`risk_coverage` of the same pairs; ``pick``: :func:`risk_threshold`."""
    pred, true = _pairs(pred, true)
    fig = _figure(10.0, 4.4)
    left, right = fig.subplots(1, 2)
    _risk_axes(left, pred, 1.0 - true, "selective risk: mean (1 - true DSC)", numbers, "")
    _risk_axes(right, pred, (true < threshold).astype(float), f"failure rate (true DSC < {threshold:.2f})",
               numbers, "failure_")
    right.axhline(pick["target_risk"], color="#c03030", linewidth=1, linestyle="-.",
                  label=f"target risk {100 * pick['target_risk']:.0f} %")
    if pick["achieved"]:
        right.plot([pick["coverage"]], [pick["failure_rate"]], "o", color="#c03030", markersize=6,
                   label=f"pred DSC >= {pick['pred_threshold']:.3f}: {100 * pick['coverage']:.0f} % kept")
    _legend_below(left)
    _legend_below(right)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png_uri(fig)


# --------------------------------------------------------------------------- case views
@dataclass
class CaseView:
    """The pictures of one row to review: ``views`` [(orientation, PNG data URI)] (empty when nothing
    could be drawn), ``slice_index`` (axial z shown, -1 when none), ``centre_yx`` (where the coronal
    and sagittal planes cut), ``drawn`` {outline name: shows in at least one view} for the outlines
    read (segmentation, pGT, reference) and ``notes`` (problems met, shown under the pictures)."""

    views: list[tuple[str, str]]
    slice_index: int  # in the RAS-reoriented array the views are cut from
    centre_yx: tuple[int, int] = (-1, -1)
    drawn: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


#: Outlines in drawing order (widest first): name, results column, colour, line width.
OUTLINES = (("reference", "reference", REF_COLOUR, REF_WIDTH), ("pGT", "pgt", PGT_COLOUR, PGT_WIDTH),
            ("segmentation", "segmentation", SEG_COLOUR, SEG_WIDTH))


def _structure_segment(seg, structure: str, label_value: int):
    """The segment of ``seg`` for a row, matched as the batch matched it: by name in a file with a
    label table (a value may mean another structure there), the only segment of an unnamed binary
    mask (a pGT file, a mask named by the CSV's label), else by label value; None when absent."""
    if seg.named:
        return next((s for s in seg.segments if s.name.lower() == structure.lower()), None)
    if len(seg.segments) <= 1:
        return seg.segments[0] if seg.segments else None
    return next((s for s in seg.segments if s.value == label_value), None)


def _read_mask_volume(path: str, grid, structure: str, label_value: int, cache: dict[str, Any]) -> np.ndarray:
    """The (z, y, x) bool mask of one structure from the file ``path``, on the image ``grid`` (empty when
    the file does not hold it: an empty segmentation is drawn as nothing)."""
    from .io import align_to_grid, read_segmentation

    if path not in cache:
        cache[path] = align_to_grid(read_segmentation(path), grid)
    seg = cache[path]
    segment = _structure_segment(seg, structure, label_value)
    if segment is None:
        return np.zeros(seg.layers.shape[1:], bool)
    return seg.layers[segment.layer] == segment.value


def _crop_box(masks: list[np.ndarray], shape: tuple[int, int],
              spacing: tuple[float, float] = (1.0, 1.0)) -> tuple[slice, slice]:
    """A box square in mm (at least 32 of the finer pixels across, within the plane) around the union
    of 2D ``masks`` with a margin of half their extent (at least 12 fine pixels); the whole plane
    when the masks are empty there. ``spacing``: (row, column) mm."""
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    spacing_ = np.asarray(spacing, float)
    fine = float(spacing_.min())
    idx = np.argwhere(union)
    lo, hi = idx.min(0), idx.max(0) + 1
    extent = float(((hi - lo) * spacing_).max())
    half_mm = max(extent / 2 + max(12 * fine, extent / 2), 32 * fine)
    centre = (lo + hi) / 2
    box = []
    for c, n, s in zip(centre, shape, spacing_):
        half = max(int(round(half_mm / s)), 1)
        start = max(0, min(int(round(c)) - half, n - 2 * half))
        box.append(slice(start, min(n, start + 2 * half)))
    return box[0], box[1]


def _scale_bar(ax, width_px: int, height_px: int, mm_per_col: float) -> None:
    """A white scale bar (with its length in mm) in the lower left corner of an image axis whose data
    units are pixels."""
    from matplotlib import patheffects

    fits = [mm for mm in SCALE_BAR_MM if mm <= 0.35 * width_px * mm_per_col]
    if not fits:
        return
    length = fits[-1] / mm_per_col
    x0, y = 0.06 * width_px - 0.5, 0.92 * height_px - 0.5
    halo = [patheffects.withStroke(linewidth=3.5, foreground="black")]
    ax.plot([x0, x0 + length], [y, y], color="white", linewidth=2.5, solid_capstyle="butt", path_effects=halo)
    ax.text(x0 + length / 2, y - 0.04 * height_px, f"{fits[-1]} mm", color="white", fontsize=7, ha="center",
            va="bottom", path_effects=halo)


def view_png(image: np.ndarray, outlines: list[tuple[np.ndarray, tuple[float, float, float], float]],
             spacing: tuple[float, float] = (1.0, 1.0), mark_row: int | None = None) -> str:
    """A 2D image (rows, columns) in grey (window: :data:`WINDOW_PERCENTILES` of the plane) with mask
    outlines ((rows, columns) bool, RGB 0-1 colour, line width in points) drawn in order, a scale
    bar, and ticks at both edges on row ``mark_row`` when given; a PNG data URI, 190 x 190 px.
    ``spacing``: (row, column) mm, which sets the pixel aspect and the scale bar."""
    fig = _figure(1.9, 1.9)
    _draw_view(fig.add_axes((0, 0, 1, 1)), image, outlines, spacing, mark_row)
    return _png_uri(fig)


def slice_views_png(views: list[tuple[np.ndarray, list[tuple[np.ndarray, tuple[float, float, float], float]], str]],
                    spacing: tuple[float, float] = (1.0, 1.0)) -> bytes:
    """Views side by side in one PNG (bytes): each (2D image, outlines as in :func:`view_png`, title),
    cropped to the outlines (:func:`_crop_box`); 2.4 inches a view. ``spacing``: (row, column) mm."""
    fig = _figure(2.4 * max(len(views), 1), 2.7)
    for i, (image, outlines, title) in enumerate(views):
        rows, cols = _crop_box([mask for mask, _, _ in outlines], image.shape, spacing)
        ax = fig.add_axes((i / len(views), 0.0, 1.0 / len(views), 2.4 / 2.7))
        _draw_view(ax, image[rows, cols], [(m[rows, cols], c, w) for m, c, w in outlines], spacing)
        fig.text((i + 0.5) / len(views), 0.97, title, ha="center", va="top", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _draw_view(ax, image: np.ndarray, outlines, spacing: tuple[float, float], mark_row: int | None = None) -> None:
    """Draw :func:`view_png`'s picture on ``ax``."""
    ax.set_facecolor("black")
    lo, hi = np.percentile(image, WINDOW_PERCENTILES) if image.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
              aspect=float(spacing[0]) / float(spacing[1]))
    for mask, colour, width in outlines:
        if mask.any() and mask.shape[0] > 1 and mask.shape[1] > 1:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)
    rows, cols = image.shape
    if mark_row is not None and 0 <= mark_row < rows:
        tick = max(2.0, 0.06 * cols)
        for x0, x1 in ((-0.5, tick - 0.5), (cols - 0.5 - tick, cols - 0.5)):
            ax.plot([x0, x1], [mark_row, mark_row], color=SLICE_MARK_COLOUR, linewidth=2)
    _scale_bar(ax, cols, rows, float(spacing[1]))
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_axis_off()


def _centre(masks: list[np.ndarray], z: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(y, x) where the coronal and sagittal planes cut: the centre of the masks on axial slice ``z``,
    else of the masks in 3D, else of the volume."""
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask
    for points in (np.argwhere(union[z]), np.argwhere(union)[:, 1:]):
        if points.size:
            centre = points.mean(axis=0)
            return int(round(centre[0])), int(round(centre[1]))
    return shape[1] // 2, shape[2] // 2


def _planes(volume, z: int, y: int, x: int):
    """The three planes through voxel (z, y, x), oriented for display: [(orientation, index into the
    (z, y, x) arrays, (row, column) spacing, flip rows, flip columns, row of the axial slice)].

    Axial shows anterior up and the patient's right on the screen's left (radiological convention),
    coronal superior up and right on the left, sagittal superior up and anterior on the left. ITK
    direction columns are LPS vectors of the index axes (x, y, z); the grid is taken as axis-aligned."""
    direction = volume.grid.direction_matrix
    sz, sy, sx = volume.spacing
    x_runs_right = bool(direction[0, 0] < -0.5)  # unflipped, the patient's left would be on the left
    y_runs_anterior = bool(direction[1, 1] < -0.5)  # unflipped, posterior would be up (axial) / left
    z_runs_superior = bool(direction[2, 2] > 0.5)  # unflipped, row 0 would be the most inferior
    mark = (volume.shape[0] - 1 - z) if z_runs_superior else z
    return [("axial", (z, slice(None), slice(None)), (sy, sx), y_runs_anterior, x_runs_right, None),
            ("coronal", (slice(None), y, slice(None)), (sz, sx), z_runs_superior, x_runs_right, mark),
            ("sagittal", (slice(None), slice(None), x), (sz, sy), z_runs_superior, y_runs_anterior, mark)]


def _oriented(plane: np.ndarray, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    plane = plane[::-1] if flip_rows else plane
    return plane[:, ::-1] if flip_cols else plane


@dataclass
class _Shown:
    """An image as the report draws it: ``volume`` reoriented to RAS array order (exact), the input's
    ``grid`` (its masks are read onto it) and the reorientation (``axes``, ``flips``), so that a slice
    index along the input's slice axis (the rows' ``worst_slice``) maps to the shown axial slice."""

    volume: Any
    grid: Any
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def of(cls, image) -> "_Shown":
        from .fingerprint import ras_axes, reorient_to_ras

        axes, flips = ras_axes(image.grid.direction)
        return cls(reorient_to_ras(image), image.grid, axes, flips)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        from .fingerprint import to_ras

        return np.ascontiguousarray(to_ras(mask, self.axes, self.flips))

    def axial(self, index: int) -> int:
        """The shown axial slice of input slice ``index`` (-1 stays -1: none recorded)."""
        n = self.volume.shape[0]
        return index if index < 0 or not self.flips[0] else n - 1 - index


def _read_outlines(shown: _Shown, row: pd.Series, cache: dict[str, Any], notes: list[str]) -> list[tuple]:
    """The masks of a row that could be read, in :data:`OUTLINES` order: [(name, mask, colour, width)],
    each reoriented as ``shown``. Raises when the segmentation itself cannot be read; a missing pGT or
    reference adds a note."""
    structure, value = str(row["structure"]), int(row["label_value"])
    masks = []
    for name, column, colour, width in OUTLINES:
        if not row[column]:
            continue
        if column == "reference" and not np.isfinite(row["true_dsc"]):
            continue  # the reference does not hold this structure (the row's note says so)
        try:
            masks.append((name, shown.mask(_read_mask_volume(row[column], shown.grid, structure, value, cache)),
                          colour, width))
        except Exception as exc:  # a report shows the problem instead of stopping
            if name == "segmentation":
                raise ValueError(f"segmentation {row['segmentation']} could not be read: {exc}") from exc
            notes.append(f"{name} {row[column]} could not be read: {exc}")
    return masks


def _case_view(shown: _Shown, row: pd.Series, cache: dict[str, Any]) -> CaseView:
    """The views of one row: axial through ``worst_slice`` (an index along the input's slice axis),
    coronal and sagittal through the masks' centre on that slice, each cropped around the masks,
    with the outlines of its masks."""
    notes: list[str] = []
    try:
        masks = _read_outlines(shown, row, cache, notes)
    except ValueError as exc:
        return CaseView([], -1, notes=[str(exc)])
    volume = shown.volume
    z = shown.axial(int(row["worst_slice"]))
    if not 0 <= z < volume.shape[0]:
        area = sum(mask.sum(axis=(1, 2)) for _, mask, _, _ in masks)
        z = int(np.argmax(area)) if np.any(area) else volume.shape[0] // 2
        notes.append(f"no worst slice recorded: showing slice {z} (largest mask)")
    y, x = _centre([m for _, m, _, _ in masks], z, volume.shape)
    drawn = {name: False for name, _, _, _ in masks}
    views = []
    for orientation, index, spacing, flip_rows, flip_cols, mark in _planes(volume, z, y, x):
        image = _oriented(np.asarray(volume.array[index], dtype=np.float32), flip_rows, flip_cols)
        planes = [(name, _oriented(mask[index], flip_rows, flip_cols), colour, width)
                  for name, mask, colour, width in masks]
        rows, cols = _crop_box([p for _, p, _, _ in planes], image.shape, spacing)
        for name, plane, _, _ in planes:
            drawn[name] = drawn[name] or bool(plane[rows, cols].any())
        at = None if mark is None or not rows.start <= mark < rows.stop else mark - rows.start
        uri = view_png(image[rows, cols], [(p[rows, cols], c, w) for _, p, c, w in planes], spacing, at)
        views.append((orientation, uri))
    return CaseView(views, z, (y, x), drawn, notes)


def case_views(rows: pd.DataFrame) -> list[CaseView]:
    """Views of ``rows`` (in their order). Each image file is read once and dropped before the
    next, so memory holds one volume and its segmentations at a time."""
    from .io import read_volume

    found: dict[Any, CaseView] = {}
    for image_path, group in rows.groupby("image", sort=False):
        try:
            shown = _Shown.of(read_volume(image_path))
        except Exception as exc:
            for index in group.index:
                found[index] = CaseView([], -1, notes=[f"image {image_path} could not be read: {exc}"])
            continue
        cache: dict[str, Any] = {}
        for index, row in group.iterrows():
            try:
                found[index] = _case_view(shown, row, cache)
            except Exception as exc:
                found[index] = CaseView([], -1, notes=[f"could not draw: {type(exc).__name__}: {exc}"])
        del shown, cache
    return [found[index] for index in rows.index]


# =========================================================================== HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px auto;max-width:1320px;
color:#1d232a;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:2px solid #d8dee4;padding-bottom:4px;margin-top:2em}
.muted{color:#5b6670;font-size:0.9em}nav a{margin-right:12px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecec}
.warn{border:2px solid #b45309;background:#fff4e5;color:#6b3a00;border-radius:4px;padding:8px 12px;margin:10px 0}
.scroll{max-height:70vh;overflow:auto;border:1px solid #d8dee4}
.scroll table{margin:0}.scroll thead th{position:sticky;top:0;z-index:1}
table.sortable th{cursor:pointer;user-select:none}table.sortable td.num{white-space:nowrap}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.st{display:inline-block;padding:1px 7px;border-radius:9px;font-weight:600;font-size:0.85em}
.st-error{background:#5b6670;color:#fff}.st-flag{background:#d64545;color:#fff}
.st-uncertain{background:#f2b705;color:#1d232a}.st-pass{background:#2e8540;color:#fff}
.ood{background:#8a4baf;color:#fff;padding:1px 6px;border-radius:9px;font-size:0.85em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #d8dee4;border-radius:4px;padding:6px;background:#fafbfc}
figure.case{width:578px}.views{display:flex;gap:4px}figcaption{font-size:0.82em;margin-top:4px;overflow-wrap:anywhere}
.note{color:#a4262c;font-size:0.82em;white-space:pre-wrap;overflow-wrap:anywhere}
.missing{width:570px;height:120px;display:flex;align-items:center;justify-content:center;background:#f3f3f3;
color:#a4262c;font-size:0.85em;text-align:center}
.key{font-size:0.82em;color:#5b6670}.key span{display:inline-block;width:18px;margin:0 4px 0 10px;vertical-align:middle}
td.msg{white-space:pre-wrap;overflow-wrap:anywhere;max-width:600px;font-family:monospace;font-size:0.85em}
"""

#: Sorts a ``table.sortable`` by the clicked header (again: the other way), on each cell's ``data-v``
#: (numbers for ``th[data-type=num]``), blanks last either way. ``#sort=KEY`` or ``#sort=KEY:desc`` in
#: the address clicks the header ``th[data-key=KEY]`` on load: a link to a sorted view.
_SORT_JS = """
(function () {
  function key(row, i, num) {
    var cell = row.cells[i], v = cell.getAttribute('data-v');
    if (v === null) { v = cell.textContent; }
    return num ? (v === '' ? NaN : parseFloat(v)) : v;
  }
  function compare(x, y, num, asc) {
    var bx = num ? isNaN(x) : x === '', by = num ? isNaN(y) : y === '';
    if (bx || by) { return bx - by; }
    var d = num ? x - y : x.localeCompare(y, undefined, {numeric: true});
    return asc ? d : -d;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending', num = th.getAttribute('data-type') === 'num';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) { return compare(key(a, i, num), key(b, i, num), num, asc); });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var wanted = /^#sort=([A-Za-z0-9_-]+)(:desc)?$/.exec(window.location.hash);
  var th = wanted && document.querySelector('table.sortable th[data-key="' + wanted[1] + '"]');
  if (th) { th.click(); if (wanted[2]) { th.click(); } }
})();
"""


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` decimals (integers as they are), missing as an en dash; text escaped."""
    if value is None or value is pd.NA:
        return "&ndash;"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else "&ndash;"
    return _e(value)


def _percent(value: Any) -> str:
    return f"{100 * value:.0f} %" if _finite_number(value) else "&ndash;"


def _corr(value: Any, n: Any) -> str:
    """A correlation for the page: "too few" below :data:`MIN_N_CORRELATION` (n given), else the value."""
    n = int(n or 0)
    return f"{TOO_FEW} (n = {n})" if n < MIN_N_CORRELATION else _fmt(value)


def _table(df: pd.DataFrame, columns: list[tuple[str, str]], row_class=None,
           cell_class: dict[str, str] | None = None) -> str:
    """An HTML table of ``df``: ``columns`` is [(column, header)]; numbers right-aligned;
    ``row_class(row)`` gives a row's CSS class, ``cell_class`` a column's."""
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for name, _ in columns:
            value = row[name]
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            cls = "num" if numeric else (cell_class or {}).get(name, "")
            cells.append(f'<td class="{cls}">{_fmt(value)}</td>' if cls else f"<td>{_fmt(value)}</td>")
        cls = f' class="{row_class(row)}"' if row_class and row_class(row) else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status_badge(state: str) -> str:
    return f'<span class="st st-{_e(state)}">{_e(state)}</span>'


def _interval(point: float, lo: float, hi: float, digits: int) -> str:
    """"0.712 [0.650&ndash;0.790]": a value with its interval where both ends are known."""
    text = _fmt(point, digits)
    if _finite_number(lo) and _finite_number(hi):
        text += f" [{lo:.{digits}f}&ndash;{hi:.{digits}f}]"
    return text


def _coverage_words(coverages: list[float]) -> str:
    """The interval level(s) for a header: "90 % interval", "intervals at 80 %, 90 %", "interval"."""
    if len(coverages) == 1:
        return f"{_percent(coverages[0])} interval"
    return "intervals at " + ", ".join(_percent(c) for c in coverages) if coverages else "interval"


def _warnings_html(warnings: list[dict[str, str]]) -> str:
    return "".join(f'<div class="warn" data-warning="{_e(w["code"])}"><b>Warning:</b> {_e(w["message"])}</div>'
                   for w in warnings)


def _threshold_sentence(pick: dict[str, Any] | None) -> str:
    """The curator's threshold for the target risk, in words (HTML)."""
    if not pick or not pick["n"]:
        return "no rows with both a predicted and a true DSC"
    target, qc = _percent(pick["target_risk"]), f"{pick['qc_threshold']:.3f}"
    if not pick["achieved"]:
        return (f"<b>no threshold achieves it</b>: no predicted-DSC threshold keeps the share of failures "
                f"(true DSC &lt; {qc}) among the accepted cases at or below {target}; the lowest any threshold "
                f"gives is {_percent(pick['min_failure_rate'])}")
    return (f"accept predicted DSC &ge; <b>{pick['pred_threshold']:.3f}</b>: {pick['n_accepted']} of {pick['n']} "
            f"cases (coverage <b>{_percent(pick['coverage'])}</b>) with {_percent(pick['failure_rate'])} "
            f"failures (true DSC &lt; {qc}), target &le; {target}")


def _summary_html(summary: dict[str, Any], source: str) -> str:
    counts = summary["triage"]
    items = [("Cases", summary["n_cases"]), ("Structures", summary["n_structures"]),
             ("Rows", summary["n_rows"]), ("Rows ok", summary["n_ok"]), ("Rows with errors", summary["n_error"]),
             ("Triage", " ".join(f"{_status_badge(s)} {counts[s]}" for s in STATUSES)),
             ("Outside the model's domain", summary["n_out_of_domain"] if summary["domain_recorded"] else "not recorded"),
             ("QC model(s)", _e(", ".join(summary["models"]) or "none")),
             ("Segmentation methods", _e(", ".join(summary["methods"]) or "none given")),
             ("Threshold", summary["threshold"]),
             ("Mean predicted DSC (all ok rows)", summary["mean_pred_dsc"]),
             (f"Share with predicted DSC < {summary['threshold']:.3f}", summary["share_below"])]
    if summary["interval_coverage"]:
        items.append(("Predicted DSC intervals", _coverage_words(summary["interval_coverage"])))
    if summary["n_ref"]:
        caution = " (see the warning above)" if summary["warnings"] and any(
            w["code"] == "true_dsc_all_zero" for w in summary["warnings"]) else ""
        items += [("Rows with a reference", summary["n_ref"])]
        if len(summary["models"]) > 1:
            items.append(("Note", "several QC models: r, MAE and the risk numbers are given per model below"))
        else:
            risk = summary["risk_coverage"]
            items += [("Pearson r, predicted vs true DSC", _corr(summary["r"], summary["n_ref"]) + caution),
                      ("MAE, predicted vs true DSC", _fmt(summary["mae"]) + caution),
                      ("AURC (risk 1 - true DSC; optimal / random)",
                       f"{_fmt(risk['aurc'])} ({_fmt(risk['aurc_optimal'])} / {_fmt(risk['aurc_random'])}){caution}"),
                      (f"Threshold for at most {_percent(summary['target_risk'])} failures",
                       _threshold_sentence(summary["risk_threshold"]))]
    # text values are HTML built here (user text escaped above), numbers are formatted
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, str) else _fmt(v)}</td></tr>" for k, v in items)
    where = f'<p class="muted">Results table: {_e(source)}</p>' if source else ""
    return f"{where}<table>{rows}</table>"


def _risk_html(ok: pd.DataFrame, summary: dict[str, Any], threshold: float) -> str:
    """The risk-coverage figures (one per QC model with references) and the curator's threshold."""
    parts = [
        '<p class="muted">How well the predicted DSC sorts cases by their true quality (failure detection, '
        "Zenk et al.): cases are kept in order of predicted DSC, highest first; at coverage c the top c share is "
        "kept. <b>Risk used: 1 - true DSC</b>, averaged over the kept cases (left); right: the share of kept cases "
        f"that fail (true DSC &lt; {threshold:.3f}). AURC is the area under the curve (the mean risk over the "
        "coverages 1/n ... 1); lower is better. Optimal: the oracle order by true DSC; random: the mean risk at "
        "every coverage. The threshold for a stated risk is the lowest predicted DSC whose accepted cases "
        "(predicted DSC at or above it) fail at that rate at most.</p>"]
    for model, numbers in summary["per_model"].items():
        risk, pick = numbers["risk_coverage"], numbers["risk_threshold"]
        if not risk["n"]:
            continue
        rows = ok[ok["model"] == model]
        title = f"{model}: n = {risk['n']}, AURC {_fmt_plain(risk['aurc'])} (optimal {_fmt_plain(risk['aurc_optimal'])})"
        uri = risk_coverage_png(rows["pred_dsc"], rows["true_dsc"], threshold, risk, pick, title)
        parts.append(
            f'<figure class="risk" data-model="{_e(model)}"><img src="{uri}" width="1000" height="440" '
            f'alt="{_e("risk-coverage curve, " + model)}"><figcaption>{_e(model)}: AURC {_fmt(risk["aurc"])} '
            f'(optimal {_fmt(risk["aurc_optimal"])}, random {_fmt(risk["aurc_random"])}, excess {_fmt(risk["e_aurc"])}); '
            f'failure AURC {_fmt(risk["failure_aurc"])} (optimal {_fmt(risk["failure_aurc_optimal"])}, random '
            f'{_fmt(risk["failure_aurc_random"])}); n = {risk["n"]}.<br>For at most {_percent(pick["target_risk"])} '
            f"failures: <span class=\"pick\">{_threshold_sentence(pick)}</span>.</figcaption></figure>")
    return "".join(parts)


#: Columns of the table of all rows: (key, header, sort type); "true_*" only with references.
_CASE_COLUMNS = (("case", "Case", "text"), ("method", "Method", "text"), ("structure", "Structure", "text"),
                 ("model", "QC model", "text"), ("pred_dsc", "Pred DSC", "num"), ("pred_hd95", "Pred HD95 (mm)", "num"),
                 ("true_dsc", "True DSC", "num"), ("true_hd95", "True HD95 (mm)", "num"),
                 ("flagged", "Flagged slices", "num"), ("worst_slice", "Worst slice (its pred DSC)", "num"),
                 ("status", "Status", "num"), ("domain", "Domain", "text"), ("note", "Note", "text"))


NUM_CLASS = ' class="num"'


def _sort_value(value: Any) -> str:
    return repr(float(value)) if _finite_number(value) else ""


def _case_cells(row: dict[str, Any], state: str) -> dict[str, tuple[str, str]]:
    """The cells of one row of the table of all rows: {key: (HTML, sort value)}."""
    domain = row["domain"]
    note = "; ".join(t for t in (row["note"], row["error"][:300]) if t)
    worst = row["worst_slice"]
    return {
        "case": (_e(row["case_id"]), row["case_id"]), "method": (_e(row["method"]), row["method"]),
        "structure": (_e(row["structure"]), row["structure"]), "model": (_e(row["model"]), row["model"]),
        "pred_dsc": (_interval(row["pred_dsc"], row["pred_dsc_lo"], row["pred_dsc_hi"], 3), _sort_value(row["pred_dsc"])),
        "pred_hd95": (_interval(row["pred_hd95"], row["pred_hd95_lo"], row["pred_hd95_hi"], 1),
                      _sort_value(row["pred_hd95"])),
        "true_dsc": (_fmt(row["true_dsc"]), _sort_value(row["true_dsc"])),
        "true_hd95": (_fmt(row["true_hd95"], 1), _sort_value(row["true_hd95"])),
        "flagged": ((f"{row['n_flagged']} / {row['n_slices']}" if row["n_slices"] >= 0 else "&ndash;"),
                    str(row["n_flagged"]) if row["n_slices"] >= 0 else ""),
        "worst_slice": ((f"z {worst} ({_fmt(row['worst_slice_dsc'])})" if worst >= 0 else "&ndash;"),
                        _sort_value(row["worst_slice_dsc"]) if worst >= 0 else ""),
        "status": (_status_badge(state), str(STATUSES.index(state))),
        "domain": ((f'<span class="ood">{_e(domain)}</span>' if domain == "out" else _e(domain)), domain),
        "note": (_e(note), note),
    }


def _cases_html(df: pd.DataFrame, summary: dict[str, Any], threshold: float) -> str:
    """Every row of the results table in one sortable table, most urgent first."""
    if df.empty:
        return "<p>The results table is empty.</p>"
    state = triage(df, threshold)
    order = df.assign(_rank=state.map(STATUSES.index)).sort_values(
        ["_rank", "pred_dsc", "case_id", "structure", "method", "model"], na_position="last", kind="stable")
    # columns that would be blank or constant throughout are left out (the summary names the one model)
    shown = {"true_dsc": np.isfinite(df["true_dsc"]).any(), "true_hd95": np.isfinite(df["true_hd95"]).any(),
             "model": df["model"].nunique() > 1, "method": (df["method"] != "").any()}
    columns = [c for c in _CASE_COLUMNS if shown.get(c[0], True)]
    level = f" [{_coverage_words(summary['interval_coverage'])}]"
    head = "".join(f'<th data-key="{key}" data-type="{kind}">{_e(title)}'
                   f'{level if key in ("pred_dsc", "pred_hd95") and np.isfinite(df[key + "_lo"]).any() else ""}</th>'
                   for key, title, kind in columns)
    body = []
    for index, row in zip(order.index, order.to_dict(orient="records")):
        cells = _case_cells(row, state[index])
        tds = "".join(f'<td{NUM_CLASS if kind == "num" else ""} data-v="{_e(cells[key][1])}">{cells[key][0]}</td>'
                      for key, _, kind in columns)
        body.append(f'<tr data-status="{state[index]}" data-case="{_e(row["case_id"])}">{tds}</tr>')
    models = "" if shown["model"] else f"QC model of every row: {_e(df['model'].iloc[0]) or 'none'}. "
    return (f'<p class="muted">All {len(df)} rows (one per case, structure and QC model), most urgent first. {models}'
            f"Status: <b>flag</b> predicted DSC &lt; {threshold:.3f}; <b>uncertain</b> its interval straddles the threshold "
            "(or no predicted DSC); <b>pass</b> the rest; <b>error</b> not scored. Click a header to sort "
            "(again to reverse); blanks stay last.</p>"
            f'<div class="scroll"><table class="sortable" id="all-rows"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _structures_html(table: pd.DataFrame, threshold: float, several_models: bool) -> str:
    if table.empty:
        return "<p>No successfully scored rows.</p>"
    thr = f"{threshold:.3f}"
    columns = [("structure", "Structure")] + ([("model", "QC model")] if several_models else []) + [
        ("n", "n"), ("mean_pred_dsc", "Mean predicted DSC"), ("share_below", f"Share predicted < {thr}")]
    shown = table.copy()
    if table["n_ref"].sum() > 0:
        columns += [("n_ref", "n with reference"), ("mean_true_dsc", "Mean true DSC"),
                    ("share_true_below", f"Share true < {thr}"), ("r", "Pearson r"), ("mae", "MAE")]
        shown["r"] = [html.unescape(_corr(r, n)) for r, n in zip(table["r"], table["n_ref"])]
    bad = lambda row: "bad" if row["mean_pred_dsc"] < threshold else ""  # noqa: E731
    return ('<p class="muted">One row per structure (and QC model), worst mean predicted DSC first; '
            f"shares are fractions of the rows (0-1); r from {MIN_N_CORRELATION} rows on.</p>"
            + _table(shown, columns, bad, cell_class={"r": "num"}))


def _histograms_html(ok: pd.DataFrame, table: pd.DataFrame, threshold: float, several_models: bool) -> str:
    if table.empty:
        return "<p>No predicted DSC to plot.</p>"
    figures = []
    for _, row in table.head(MAX_HISTOGRAMS).iterrows():
        rows = ok[(ok["structure"] == row["structure"]) & (ok["model"] == row["model"])]
        name = f"{row['structure']} ({row['model']})" if several_models else str(row["structure"])
        title = f"{name}: n={row['n']}, mean {_fmt(row['mean_pred_dsc'])}"
        uri = histogram_png(rows["pred_dsc"], title, threshold)
        figures.append(f'<figure><img src="{uri}" alt="{_e("predicted DSC histogram of " + name)}"></figure>')
    more = (f'<p class="muted">{len(table) - MAX_HISTOGRAMS} more structures: see structures.csv.</p>'
            if len(table) > MAX_HISTOGRAMS else "")
    return (f'<p class="muted">Bins of 0.05; dashed line: threshold {threshold:.3f}. Worst mean first.</p>'
            f'<div class="grid">{"".join(figures)}</div>{more}')


def _swatch(name: str, colour: tuple[float, float, float], width: float) -> str:
    rgb = "#" + "".join(f"{round(255 * c):02x}" for c in colour)
    return f'<span data-key="{_e(name)}" style="background:{rgb};height:{max(2, round(width * 1.39))}px"></span>'


def _key_html(view: CaseView) -> str:
    """The legend of one case's views: only the outlines drawn (read from a file given), plus the marks."""
    words = {"segmentation": "segmentation", "pGT": "pseudo ground truth (pGT)", "reference": "reference"}
    parts = []
    for name, _, colour, width in reversed(OUTLINES):  # the segmentation first, as it is the subject
        if name in view.drawn:
            missing = "" if view.drawn[name] else " (not in these planes)"
            parts.append(_swatch(name, colour, width) + words[name] + missing)
    if view.views:
        parts.append(_swatch("slice", SLICE_MARK_COLOUR, 2) + "axial slice (ticks); bar: scale in mm")
    return f'<div class="key">{"".join(parts)}</div>'


def _review_figure(row: pd.Series, state: str, view: CaseView) -> str:
    pictures = "".join(f'<img data-view="{o}" src="{uri}" width="190" height="190" '
                       f'alt="{_e(row["case_id"])} {_e(row["structure"])} {o}">' for o, uri in view.views)
    if not pictures:
        pictures = '<div class="missing">no picture: file could not be read</div>'
    true = f" &middot; true DSC {_fmt(row['true_dsc'])}" if math.isfinite(row["true_dsc"]) else ""
    method = f" &middot; {_e(row['method'])}" if row["method"] else ""
    domain = ' &middot; <span class="ood">out of domain</span>' if row["domain"] == "out" else ""
    # the user's own index: along the image array's slice axis (the one closest to superior-inferior)
    axis = f" (array axis {int(row['slice_axis'])})" if row["slice_axis"] >= 0 else ""
    where = (f"worst slice {int(row['worst_slice'])}{axis}"
             if view.slice_index >= 0 and row["worst_slice"] >= 0 else
             ("no worst slice recorded" if view.slice_index >= 0 else "no slice"))
    notes = "".join(f'<div class="note">{_e(n)}</div>' for n in view.notes + ([row["note"]] if row["note"] else []))
    return (f'<figure class="case" data-case="{_e(row["case_id"])}" data-structure="{_e(row["structure"])}" '
            f'data-method="{_e(row["method"])}" data-status="{state}"><div class="views">{pictures}</div>'
            f"<figcaption><b>{_e(row['case_id'])}</b> &middot; {_e(row['structure'])}{method} &middot; "
            f"{_status_badge(state)}{domain}<br>predicted DSC "
            f"{_interval(row['pred_dsc'], row['pred_dsc_lo'], row['pred_dsc_hi'], 3)}{true} &middot; {where}"
            f"</figcaption>{_key_html(view)}{notes}</figure>")


def _review_html(df: pd.DataFrame, worst_n: int, threshold: float) -> str:
    """The flagged and uncertain rows (never passing ones) with views of their worst slice."""
    if ok_rows(df).empty:
        return "<p>No successfully scored rows.</p>"
    candidates = review_rows(df, threshold)
    if candidates.empty:
        return (f"<p>None: no row is flagged or uncertain (every scored row has predicted DSC &ge; "
                f"{threshold:.3f}, with its interval, where given, above the threshold).</p>")
    shown = candidates.head(max(int(worst_n), 0))
    state = triage(df, threshold)
    figures = [_review_figure(row, state[index], view)
               for (index, row), view in zip(shown.iterrows(), case_views(shown))]
    more = f" ({len(candidates) - len(shown)} more in the table of all rows)" if len(shown) < len(candidates) else ""
    return (f'<p class="muted">{len(shown)} of {len(candidates)} flagged or uncertain rows, lowest predicted DSC '
            f"first{more}. Views: axial through the worst slice, coronal and sagittal through the masks' centre on "
            "it. Outlines: the reference widest underneath, the segmentation thinnest on top, so that coinciding "
            f'outlines all stay visible.</p><div class="grid">{"".join(figures)}</div>')


def _scatter_html(ok: pd.DataFrame, summary: dict[str, Any], threshold: float) -> str:
    parts = []
    for model, stats_ in summary["per_model"].items():
        if not stats_["n_ref"]:
            continue
        r = html.unescape(_corr(stats_["r"], stats_["n_ref"]))
        title = f"{model}: r = {r}, MAE = {_fmt_plain(stats_['mae'])} (n = {stats_['n_ref']})"
        uri = scatter_png(ok[ok["model"] == model], threshold, title)
        parts.append(f'<figure><img src="{uri}" alt="{_e("predicted vs true DSC, " + model)}">'
                     f"<figcaption>{_e(model)}: Pearson r = {_e(r)}, MAE = {_fmt(stats_['mae'])}, "
                     f"n = {stats_['n_ref']}</figcaption></figure>")
    return f'<div class="grid">{"".join(parts)}</div>'


def _fmt_plain(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _ranking_html(ranking: pd.DataFrame, summary: dict[str, Any], several_models: bool) -> str:
    columns = ([("model", "QC model")] if several_models else []) + [
        ("rank_pred", "Rank (pseudo)"), ("method", "Method"), ("n", "n"), ("mean_pred_dsc", "Mean predicted DSC")]
    with_ref = ranking["n_ref"].sum() > 0
    if with_ref:
        columns += [("n_ref", "n with reference"), ("mean_true_dsc", "Mean true DSC"), ("rank_true", "Rank (true)")]
    shown = ranking.copy()
    for column in ("rank_pred", "rank_true"):
        shown[column] = [int(v) if math.isfinite(v) else None for v in shown[column].astype(float)]
    text = _table(shown, columns)
    if with_ref:
        for model in ranking["model"].unique():
            numbers = summary["per_model"][model]
            which = f" ({_e(model)})" if several_models else ""
            text += (f"<p>Kendall tau between the pseudo and the true ranking{which}: "
                     f"<b>{_corr(numbers['kendall_tau'], numbers['kendall_n'])}</b></p>")
    return ('<p class="muted">Methods ranked by mean predicted DSC (rank 1 = best); compare methods run on '
            f"the same cases. Kendall tau from {MIN_N_CORRELATION} methods on.</p>" + text)


def _list_html(rows: pd.DataFrame, what: str) -> str:
    if rows.empty:
        return f"<p>No rows {what}.</p>"
    columns = [("rank", "#"), ("case_id", "Case"), ("structure", "Structure"), ("method", "Method"),
               ("pred_dsc", "Predicted DSC"), ("true_dsc", "True DSC"), ("worst_slice", "Worst slice"),
               ("segmentation", "Segmentation")]
    return _table(rows, columns)


def _errors_html(errors: pd.DataFrame) -> str:
    if errors.empty:
        return "<p>No errors.</p>"
    shown = errors.head(MAX_ERRORS_SHOWN).copy()
    shown["file"] = [s or i for s, i in zip(shown["segmentation"], shown["image"])]
    shown["message"] = [m[:4000] for m in shown["error"]]
    table = _table(shown, [("case_id", "Case"), ("structure", "Structure"), ("method", "Method"),
                           ("file", "File"), ("message", "Message")], cell_class={"message": "msg"})
    more = (f'<p class="muted">{len(errors) - MAX_ERRORS_SHOWN} more error rows in the results table.</p>'
            if len(errors) > MAX_ERRORS_SHOWN else "")
    return table + more


def render_html(df: pd.DataFrame, summary: dict[str, Any], *, threshold: float, worst_n: int, top_n: int,
                source: str = "") -> str:
    """The report page (a string) for a :func:`load_table` table and its :func:`summarise` numbers."""
    ok = ok_rows(df)
    structures = structure_table(df, threshold)
    ranking = method_ranking(df)
    several = len(summary["models"]) > 1
    parts = [("summary", "Summary", _summary_html(summary, source))]
    if summary["n_ref"]:
        parts.append(("risk", "Risk-coverage: can the predicted DSC be trusted to triage?",
                      _risk_html(ok, summary, threshold)))
    parts += [("rows", "All rows", _cases_html(df, summary, threshold)),
              ("review", "To review: flagged and uncertain rows", _review_html(df, worst_n, threshold)),
              ("structures", "Per structure", _structures_html(structures, threshold, several)),
              ("histograms", "Predicted DSC per structure", _histograms_html(ok, structures, threshold, several))]
    if summary["n_ref"]:
        parts.append(("scatter", "Predicted vs true DSC", _scatter_html(ok, summary, threshold)))
    if not ranking.empty:
        parts.append(("ranking", "Method ranking", _ranking_html(ranking, summary, several)))
    parts.append(("lists", "Lists for active learning and self-training",
                  f"<h3>Active learning: the {top_n} lowest predicted DSC (correct these first)</h3>"
                  + _list_html(active_learning_list(df, top_n), "scored")
                  + f"<h3>Self-training: the {top_n} highest predicted DSC &ge; {threshold:.3f} (pseudo-labels to keep)"
                  "</h3>" + _list_html(self_training_list(df, threshold, top_n),
                                       f"with predicted DSC at or above {threshold:.3f}")))
    parts.append(("errors", "Errors", _errors_html(error_rows(df))))
    nav = "".join(f'<a href="#{anchor}">{_e(title.split(":")[0])}</a>' for anchor, title, _ in parts)
    sections = "".join(f'<section id="{anchor}"><h2>{number}. {_e(title)}</h2>\n{body}\n</section>\n'
                       for number, (anchor, title, body) in enumerate(parts, 1))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>SegQC batch report</title><style>{_CSS}</style></head><body>\n"
            f"<h1>SegQC batch report</h1><p class=\"muted\">Generated {generated}. Predicted DSC is the QC "
            "model's estimate without ground truth; true DSC is measured against a reference where one exists."
            f"</p>\n{_warnings_html(summary['warnings'])}<nav>{nav}</nav>\n{sections}"
            f"<script>{_SORT_JS}</script></body></html>\n")


def write_report(table: pd.DataFrame | str | Path, out_dir: Path, *, threshold: float = 0.8, worst_n: int = 12,
                 top_n: int = 20, target_risk: float = DEFAULT_TARGET_RISK) -> Path:
    """Write the curator report of a batch results table into ``out_dir`` (created if needed).

    table: the results DataFrame (columns :data:`COLUMNS`; the interval, ``domain`` and ``note``
        columns may be missing) or the path of ``results.csv``.
    threshold: DSC (0-1) below which a segmentation counts as failed (triage, shares, self-training cut).
    worst_n: flagged or uncertain rows shown with views of their worst slice (lowest predicted DSC first).
    top_n: length of the active-learning and self-training lists.
    target_risk: the largest failure rate (0-1) among accepted cases the curator's threshold allows
        (:func:`risk_threshold`).

    Files (each written atomically): ``report.html`` (self-contained), ``structures.csv``,
    ``ranking.csv`` (only when methods are ranked), ``active_learning.csv``, ``self_training.csv``,
    ``summary.json`` (:func:`summarise`). Unreadable image files show a note in their view.
    Returns the path of ``report.html``.
    """
    df = load_table(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(df, threshold, target_risk)
    _write_csv(structure_table(df, threshold), out_dir / "structures.csv")
    ranking = method_ranking(df)
    if not ranking.empty:
        _write_csv(ranking, out_dir / "ranking.csv")
    elif (out_dir / "ranking.csv").exists():
        (out_dir / "ranking.csv").unlink()  # left by an earlier report of another table
    _write_csv(active_learning_list(df, top_n), out_dir / "active_learning.csv")
    _write_csv(self_training_list(df, threshold, top_n), out_dir / "self_training.csv")
    write_bytes_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    source = str(table) if isinstance(table, (str, Path)) else ""
    page = render_html(df, summary, threshold=threshold, worst_n=worst_n, top_n=top_n, source=source)
    return write_bytes_atomic(out_dir / "report.html", page)
