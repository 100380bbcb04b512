"""The dataset-curator report of ``segqc batch``: statistics, CSV/JSON lists and one HTML page.

Input is the batch results table (``results.csv``, see :data:`COLUMNS`): one row per
(case, structure, QC model), with the predicted (pseudo) DSC of the QC model and, where a reference
segmentation exists, the true DSC. Rows whose ``status`` is not ``"ok"`` are listed as errors and
left out of every statistic.

Two layers, kept apart:

- **statistics** (pandas/numpy/scipy, no plotting): :func:`load_table`, :func:`structure_table`
  (the SegAE / Quality Sentinel dataset table: per structure the mean predicted DSC and the share
  below the threshold, with references the same for the true DSC plus Pearson r and MAE),
  :func:`method_ranking` and :func:`kendall_taus` (segmentation methods ranked by mean pseudo-DSC,
  compared with the ranking by true DSC), :func:`active_learning_list`, :func:`self_training_list`
  and :func:`summarise` (the numbers of ``summary.json``);
- **the report** (matplotlib Agg figures, HTML): :func:`write_report` writes ``report.html`` (one
  self-contained file: inline CSS, images as base64 PNG, no script, no network) and the CSV/JSON
  files beside it, each atomically (temporary file in the same folder, then ``os.replace``).

All DSC values are fractions in [0, 1]; HD95 is in mm; runtimes in seconds.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .io import write_bytes_atomic
from .qc import json_value

#: Columns of the batch results table and their kind (a contract with ``batch.py``). Integer
#: columns use -1 for "none" (``worst_slice``, ``label_value`` of an error row).
COLUMNS: dict[str, str] = {
    "case_id": "str", "structure": "str", "label_value": "int", "method": "str", "model": "str",
    "pred_dsc": "float", "pred_hd95": "float", "n_slices": "int", "n_flagged": "int", "worst_slice": "int",
    "worst_slice_dsc": "float", "threshold": "float", "true_dsc": "float", "true_hd95": "float",
    "image": "str", "segmentation": "str", "reference": "str", "pgt": "str", "runtime_s": "float",
    "status": "str", "error": "str", "worker": "str",
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

#: Outline colours of the thumbnails (RGB 0-1): segmentation, pseudo ground truth, reference.
SEG_COLOUR = (1.0, 0.0, 0.0)
PGT_COLOUR = (0.0, 1.0, 0.0)
REF_COLOUR = (1.0, 1.0, 0.0)
#: Most histograms drawn (structures with the lowest mean predicted DSC first); most error rows shown.
MAX_HISTOGRAMS = 48
MAX_ERRORS_SHOWN = 500
#: Percentiles of the grey window of thumbnails.
WINDOW_PERCENTILES = (1.0, 99.0)


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
    columns as int (-1 for blanks), ``status`` lower-case. Extra columns are kept.

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
    df["status"] = df["status"].str.strip().str.lower()
    return df.reset_index(drop=True)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows scored without error (``status == "ok"``): the only ones statistics use."""
    return df[df["status"] == "ok"]


def error_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with any status other than ``"ok"``."""
    return df[df["status"] != "ok"]


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


def agreement(pred: Any, true: Any) -> dict[str, float]:
    """Agreement of predicted with true DSC over the pairs where both are finite.

    Returns ``n_pairs``, ``r`` (Pearson correlation; NaN with fewer than 2 pairs or a constant
    side) and ``mae`` (mean absolute error, DSC units; NaN without pairs).
    """
    pred = np.asarray(pred, dtype=float).ravel()
    true = np.asarray(true, dtype=float).ravel()
    keep = np.isfinite(pred) & np.isfinite(true)
    pred, true = pred[keep], true[keep]
    n = int(pred.size)
    mae = float(np.mean(np.abs(pred - true))) if n else math.nan
    r = math.nan
    if n >= 2 and np.ptp(pred) > 0 and np.ptp(true) > 0:
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


def kendall_taus(ranking: pd.DataFrame) -> dict[str, float]:
    """Kendall tau-b (``scipy.stats.kendalltau``) between the ranking of methods by mean predicted DSC
    and by mean true DSC, per QC model of ``ranking`` (from :func:`method_ranking`); computed over
    the methods having both means, NaN with fewer than 2 such methods or a constant side."""
    taus: dict[str, float] = {}
    for model, group in ranking.groupby("model", sort=True):
        pred, true = group["mean_pred_dsc"].astype(float), group["mean_true_dsc"].astype(float)
        both = group[np.isfinite(pred) & np.isfinite(true)]
        tau = math.nan
        if len(both) >= 2 and both["mean_pred_dsc"].nunique() > 1 and both["mean_true_dsc"].nunique() > 1:
            tau = float(stats.kendalltau(both["mean_pred_dsc"], both["mean_true_dsc"]).statistic)
        taus[model] = tau
    return taus


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


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: json_value(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def summarise(table: pd.DataFrame | str | Path, threshold: float = 0.8) -> dict[str, Any]:
    """The key numbers of a results table (what ``summary.json`` holds), JSON-ready (NaN -> None).

    Keys: ``n_rows``, ``n_ok``, ``n_error``, ``n_cases`` (distinct case ids, all rows),
    ``n_structures`` (distinct structures among ok rows), ``models``, ``methods`` (non-empty,
    sorted), ``threshold``; ``mean_pred_dsc`` and ``share_below`` over all ok rows;
    ``structures``: list of :func:`structure_table` records (structure, model, n, mean_pred_dsc,
    share_below, n_ref, mean_true_dsc, share_true_below, r, mae); ``n_ref``, ``r``, ``mae``
    (predicted vs true DSC over ok rows with a reference); ``ranking``: :func:`method_ranking`
    records; ``kendall_tau``; ``per_model``: the same overall numbers per QC model. With several
    QC models in the table, the top-level ``r``, ``mae`` and ``kendall_tau`` are None (mixing
    models' scores means nothing): read them under ``per_model``.
    """
    df = load_table(table)
    ok = ok_rows(df)
    ranking = method_ranking(df)
    taus = kendall_taus(ranking)
    per_model = {}
    for model, group in ok.groupby("model", sort=True):
        agree = agreement(group["pred_dsc"], group["true_dsc"])
        per_model[model] = {
            "n": int(_finite(group["pred_dsc"]).size), "mean_pred_dsc": _mean(group["pred_dsc"]),
            "share_below": _share_below(group["pred_dsc"], threshold), "n_ref": agree["n_pairs"],
            "mean_true_dsc": _mean(group["true_dsc"]), "r": agree["r"], "mae": agree["mae"],
            "kendall_tau": taus.get(model, math.nan),
        }
    single = next(iter(per_model.values())) if len(per_model) == 1 else None
    summary = {
        "n_rows": len(df), "n_ok": len(ok), "n_error": len(df) - len(ok),
        "n_cases": int(df["case_id"].nunique()), "n_structures": int(ok["structure"].nunique()),
        "models": sorted(ok["model"].unique().tolist() or df["model"].unique().tolist()),
        "methods": sorted(m for m in ok["method"].unique().tolist() if m),
        "threshold": float(threshold),
        "mean_pred_dsc": _mean(ok["pred_dsc"]), "share_below": _share_below(ok["pred_dsc"], threshold),
        "n_ref": int(single["n_ref"]) if single else int(agreement(ok["pred_dsc"], ok["true_dsc"])["n_pairs"]),
        "r": single["r"] if single else math.nan, "mae": single["mae"] if single else math.nan,
        "kendall_tau": single["kendall_tau"] if single else math.nan,
        "structures": _records(structure_table(df, threshold)),
        "ranking": _records(ranking),
        "per_model": per_model,
    }
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


# --------------------------------------------------------------------------- thumbnails
@dataclass
class Thumbnail:
    """One worst-case panel: ``uri`` (PNG data URI, None when nothing could be drawn), ``slice_index``
    (z index shown, -1 when none) and ``notes`` (problems met, shown under the picture)."""

    uri: str | None
    slice_index: int
    notes: list[str]


def _structure_segment(seg, structure: str, label_value: int):
    """The segment of ``seg`` for a row: by label value (the name breaks ties between layers), then
    by name, then the only segment of a binary mask (a pGT file)."""
    by_value = [s for s in seg.segments if s.value == label_value]
    if len(by_value) == 1:
        return by_value[0]
    named = [s for s in (by_value or seg.segments) if s.name.lower() == structure.lower()]
    if named:
        return named[0]
    if by_value:
        return by_value[0]
    if len(seg.segments) == 1:
        return seg.segments[0]
    raise ValueError(f"{seg.name}: no segment with label value {label_value} or name {structure!r}")


def _read_mask_volume(path: str, grid, structure: str, label_value: int, cache: dict[str, Any]) -> np.ndarray:
    """The (z, y, x) bool mask of one structure from the file ``path``, on the image ``grid``."""
    from .io import align_to_grid, read_segmentation

    if path not in cache:
        cache[path] = align_to_grid(read_segmentation(path), grid)
    seg = cache[path]
    segment = _structure_segment(seg, structure, label_value)
    return seg.layers[segment.layer] == segment.value


def _display_flips(grid) -> tuple[bool, bool]:
    """(flip rows, flip columns) so that an axial slice shows anterior up and the patient's right on
    the left of the screen (radiological convention): ITK direction columns are LPS vectors."""
    direction = grid.direction_matrix
    return bool(direction[1, 1] < -0.5), bool(direction[0, 0] < -0.5)


def _crop_box(masks: list[np.ndarray], shape: tuple[int, int]) -> tuple[slice, slice]:
    """A square box (at least 64 px, within the slice) around the union of 2D ``masks`` with a
    margin of half their extent (at least 12 px); the whole slice when the masks are empty there."""
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    idx = np.argwhere(union)
    lo, hi = idx.min(0), idx.max(0) + 1
    extent = int((hi - lo).max())
    half = max(extent // 2 + max(12, extent // 2), 32)
    centre = (lo + hi) // 2
    box = []
    for c, n in zip(centre, shape):
        start = max(0, min(int(c) - half, n - 2 * half))
        box.append(slice(start, min(n, start + 2 * half)))
    return box[0], box[1]


def thumbnail_png(image: np.ndarray, outlines: list[tuple[np.ndarray, tuple[float, float, float]]],
                  spacing_yx: tuple[float, float] = (1.0, 1.0)) -> str:
    """A 2D image (y, x) in grey (window: :data:`WINDOW_PERCENTILES` of the slice) with mask
    outlines ((y, x) bool, RGB 0-1 colour) drawn in order, as a PNG data URI (280 x 280 px).
    ``spacing_yx`` (mm) sets the pixel aspect."""
    fig = _figure(2.8, 2.8)
    ax = fig.add_axes((0, 0, 1, 1))
    lo, hi = np.percentile(image, WINDOW_PERCENTILES) if image.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
              aspect=float(spacing_yx[0]) / float(spacing_yx[1]))
    for mask, colour in outlines:
        if mask.any() and mask.shape[0] > 1 and mask.shape[1] > 1:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.3)
    ax.set_axis_off()
    return _png_uri(fig)


def _thumbnail(volume, row: pd.Series, cache: dict[str, Any]) -> Thumbnail:
    """The panel of one row: slice ``worst_slice`` of the image with the outlines of its masks."""
    notes: list[str] = []
    structure, value = str(row["structure"]), int(row["label_value"])
    try:
        seg = _read_mask_volume(row["segmentation"], volume.grid, structure, value, cache)
    except Exception as exc:  # a report shows the problem instead of stopping
        return Thumbnail(None, -1, [f"segmentation {row['segmentation']} could not be read: {exc}"])
    overlays: list[tuple[np.ndarray, tuple[float, float, float]]] = []
    for column, colour, what in (("reference", REF_COLOUR, "reference"), ("pgt", PGT_COLOUR, "pGT")):
        if row[column]:
            try:
                overlays.append((_read_mask_volume(row[column], volume.grid, structure, value, cache), colour))
            except Exception as exc:
                notes.append(f"{what} {row[column]} could not be read: {exc}")
    z = int(row["worst_slice"])
    if not 0 <= z < volume.shape[0]:
        area = sum(mask.sum(axis=(1, 2)) for mask in [seg] + [m for m, _ in overlays])
        z = int(np.argmax(area)) if np.any(area) else volume.shape[0] // 2
        notes.append(f"no worst slice recorded: showing slice {z} (largest mask)")
    flip_rows, flip_cols = _display_flips(volume.grid)

    def view(plane: np.ndarray) -> np.ndarray:
        plane = plane[::-1] if flip_rows else plane
        return plane[:, ::-1] if flip_cols else plane

    image = view(np.asarray(volume.array[z], dtype=np.float32))
    planes = [(view(mask[z]), colour) for mask, colour in overlays] + [(view(seg[z]), SEG_COLOUR)]
    rows, cols = _crop_box([p for p, _ in planes], image.shape)
    uri = thumbnail_png(image[rows, cols], [(p[rows, cols], c) for p, c in planes], volume.spacing[1:])
    return Thumbnail(uri, z, notes)


def thumbnails(rows: pd.DataFrame) -> list[Thumbnail]:
    """Panels of ``rows`` (in their order). Each image file is read once and dropped before the
    next, so memory holds one volume and its segmentations at a time."""
    from .io import read_volume

    panels: dict[Any, Thumbnail] = {}
    for image_path, group in rows.groupby("image", sort=False):
        try:
            volume = read_volume(image_path)
        except Exception as exc:
            for index in group.index:
                panels[index] = Thumbnail(None, -1, [f"image {image_path} could not be read: {exc}"])
            continue
        cache: dict[str, Any] = {}
        for index, row in group.iterrows():
            try:
                panels[index] = _thumbnail(volume, row, cache)
            except Exception as exc:
                panels[index] = Thumbnail(None, -1, [f"could not draw: {type(exc).__name__}: {exc}"])
        del volume, cache
    return [panels[index] for index in rows.index]


# =========================================================================== HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1d232a;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:2px solid #d8dee4;padding-bottom:4px;margin-top:2em}
.muted{color:#5b6670;font-size:0.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecec}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #d8dee4;border-radius:4px;padding:6px;background:#fafbfc}
figure.thumb{width:282px}figcaption{font-size:0.82em;margin-top:4px;overflow-wrap:anywhere}
.note{color:#a4262c;font-size:0.82em;white-space:pre-wrap;overflow-wrap:anywhere}
.missing{width:280px;height:120px;display:flex;align-items:center;justify-content:center;background:#f3f3f3;
color:#a4262c;font-size:0.85em;text-align:center}
.key span{display:inline-block;width:14px;height:3px;margin:0 4px 3px 10px;vertical-align:middle}
td.msg{white-space:pre-wrap;overflow-wrap:anywhere;max-width:600px;font-family:monospace;font-size:0.85em}
"""


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _fmt(value: Any) -> str:
    """Numbers with 3 decimals (integers as they are), missing as an en dash; text escaped."""
    if value is None or value is pd.NA:
        return "&ndash;"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}" if math.isfinite(value) else "&ndash;"
    return _e(value)


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


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _summary_html(summary: dict[str, Any], source: str) -> str:
    items = [("Cases", summary["n_cases"]), ("Structures", summary["n_structures"]),
             ("Rows", summary["n_rows"]), ("Rows ok", summary["n_ok"]), ("Rows with errors", summary["n_error"]),
             ("QC model(s)", ", ".join(summary["models"]) or "none"),
             ("Segmentation methods", ", ".join(summary["methods"]) or "none given"),
             ("Threshold", summary["threshold"]),
             ("Mean predicted DSC (all ok rows)", summary["mean_pred_dsc"]),
             (f"Share with predicted DSC < {summary['threshold']:.3f}", summary["share_below"])]
    if summary["n_ref"]:
        items += [("Rows with a reference", summary["n_ref"]),
                  ("Pearson r, predicted vs true DSC", summary["r"]), ("MAE, predicted vs true DSC", summary["mae"])]
        if len(summary["models"]) > 1:
            items.append(("Note", "several QC models: r and MAE are given per model below"))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items)
    where = f'<p class="muted">Results table: {_e(source)}</p>' if source else ""
    return f"{where}<table>{rows}</table>"


def _structures_html(table: pd.DataFrame, threshold: float, several_models: bool) -> str:
    if table.empty:
        return "<p>No successfully scored rows.</p>"
    thr = f"{threshold:.3f}"
    columns = [("structure", "Structure")] + ([("model", "QC model")] if several_models else []) + [
        ("n", "n"), ("mean_pred_dsc", "Mean predicted DSC"), ("share_below", f"Share predicted < {thr}")]
    if table["n_ref"].sum() > 0:
        columns += [("n_ref", "n with reference"), ("mean_true_dsc", "Mean true DSC"),
                    ("share_true_below", f"Share true < {thr}"), ("r", "Pearson r"), ("mae", "MAE")]
    bad = lambda row: "bad" if row["mean_pred_dsc"] < threshold else ""  # noqa: E731
    return ('<p class="muted">One row per structure (and QC model), worst mean predicted DSC first; '
            "shares are fractions of the rows (0-1).</p>" + _table(table, columns, bad))


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


def _worst_html(worst: pd.DataFrame, panels: list[Thumbnail]) -> str:
    if worst.empty:
        return "<p>No successfully scored rows.</p>"
    key = ('<p class="key muted">Outlines:<span style="background:#f00"></span>segmentation'
           '<span style="background:#0f0"></span>pseudo ground truth (pGT)'
           '<span style="background:#ff0"></span>reference. Axial slice = the lowest-scored slice.</p>')
    figures = []
    for (_, row), panel in zip(worst.iterrows(), panels):
        picture = (f'<img src="{panel.uri}" width="280" height="280" alt="{_e(row["case_id"])} {_e(row["structure"])}">'
                   if panel.uri else '<div class="missing">no picture: file could not be read</div>')
        true = f" &middot; true DSC {_fmt(row['true_dsc'])}" if math.isfinite(row["true_dsc"]) else ""
        method = f" &middot; {_e(row['method'])}" if row["method"] else ""
        notes = "".join(f'<div class="note">{_e(n)}</div>' for n in panel.notes)
        where = f"slice z={panel.slice_index}" if panel.slice_index >= 0 else "no slice"
        figures.append(
            f'<figure class="thumb" data-case="{_e(row["case_id"])}" data-structure="{_e(row["structure"])}" '
            f'data-method="{_e(row["method"])}">'
            f"{picture}<figcaption><b>{_e(row['case_id'])}</b> &middot; {_e(row['structure'])}{method}<br>"
            f"predicted DSC {_fmt(row['pred_dsc'])}{true} &middot; {where}</figcaption>{notes}</figure>")
    return key + f'<div class="grid">{"".join(figures)}</div>'


def _scatter_html(ok: pd.DataFrame, summary: dict[str, Any], threshold: float) -> str:
    parts = []
    for model, stats_ in summary["per_model"].items():
        if not stats_["n_ref"]:
            continue
        title = (f"{model}: r = {_fmt_plain(stats_['r'])}, MAE = {_fmt_plain(stats_['mae'])} "
                 f"(n = {stats_['n_ref']})")
        uri = scatter_png(ok[ok["model"] == model], threshold, title)
        parts.append(f'<figure><img src="{uri}" alt="{_e("predicted vs true DSC, " + model)}">'
                     f"<figcaption>{_e(model)}: Pearson r = {_fmt(stats_['r'])}, MAE = {_fmt(stats_['mae'])}, "
                     f"n = {stats_['n_ref']}</figcaption></figure>")
    return f'<div class="grid">{"".join(parts)}</div>'


def _fmt_plain(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _ranking_html(ranking: pd.DataFrame, taus: dict[str, float], several_models: bool) -> str:
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
        for model, tau in taus.items():
            which = f" ({_e(model)})" if several_models else ""
            text += f"<p>Kendall tau between the pseudo and the true ranking{which}: <b>{_fmt(tau)}</b></p>"
    return ('<p class="muted">Methods ranked by mean predicted DSC (rank 1 = best); compare methods run on '
            "the same cases.</p>" + text)


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
    taus = kendall_taus(ranking)
    several = len(summary["models"]) > 1
    worst = active_learning_list(df, worst_n)
    panels = thumbnails(worst)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        _section("summary", "1. Summary", _summary_html(summary, source)),
        _section("structures", "2. Per structure", _structures_html(structures, threshold, several)),
        _section("histograms", "3. Predicted DSC per structure", _histograms_html(ok, structures, threshold, several)),
        _section("worst", f"4. Worst {len(worst)} (lowest predicted DSC)", _worst_html(worst, panels)),
    ]
    if summary["n_ref"]:
        sections.append(_section("scatter", "5. Predicted vs true DSC", _scatter_html(ok, summary, threshold)))
    if not ranking.empty:
        sections.append(_section("ranking", "6. Method ranking", _ranking_html(ranking, taus, several)))
    sections.append(_section(
        "lists", "7. Lists for active learning and self-training",
        f"<h3>Active learning: the {top_n} lowest predicted DSC (correct these first)</h3>"
        + _list_html(active_learning_list(df, top_n), "scored")
        + f"<h3>Self-training: the {top_n} highest predicted DSC &ge; {threshold:.3f} (pseudo-labels to keep)</h3>"
        + _list_html(self_training_list(df, threshold, top_n), f"with predicted DSC at or above {threshold:.3f}")))
    sections.append(_section("errors", "8. Errors", _errors_html(error_rows(df))))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>SegQC batch report</title><style>{_CSS}</style></head><body>\n"
            f"<h1>SegQC batch report</h1><p class=\"muted\">Generated {generated}. Predicted DSC is the QC "
            "model's estimate without ground truth; true DSC is measured against a reference where one exists."
            f"</p>\n{''.join(sections)}</body></html>\n")


def write_report(table: pd.DataFrame | str | Path, out_dir: Path, *, threshold: float = 0.8, worst_n: int = 12,
                 top_n: int = 20) -> Path:
    """Write the curator report of a batch results table into ``out_dir`` (created if needed).

    table: the results DataFrame (columns :data:`COLUMNS`) or the path of ``results.csv``.
    threshold: DSC (0-1) below which a segmentation counts as failed (shares, self-training cut).
    worst_n: rows with the lowest predicted DSC shown as thumbnails.
    top_n: length of the active-learning and self-training lists.

    Files (each written atomically): ``report.html`` (self-contained), ``structures.csv``,
    ``ranking.csv`` (only when methods are ranked), ``active_learning.csv``, ``self_training.csv``,
    ``summary.json`` (:func:`summarise`). Unreadable image files show a note in their thumbnail.
    Returns the path of ``report.html``.
    """
    df = load_table(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(df, threshold)
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
